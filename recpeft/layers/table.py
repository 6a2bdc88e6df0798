"""What the LoRA embedding and embedding-bag layers share: the adapter of a frozen table.

E [V, D] frozen; A [V, r] is itself a table of dimension r, B [r, D] dense; s the scale.
Looked-up rows become E[i] + s·A[i]·B, pooled bags Σ w_i·E[i] + s·(Σ w_i·A[i])·B.
A starts at zero and B random, so rows of A that no batch touched stay exactly zero: merging
adds s·A[rows]·B to those rows only, and the file stores only touched rows.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from recpeft.kernels import BagLayout, dispatch
from recpeft.utils.validation import check_state_keys, check_state_shapes

from .adapter_holder import AdapterStateError
from .base import AdapterFactors, check_factors, merge_product
from .weight import LoraWeightLayer

A_DENSE = "lora_embedding_A.weight"
A_ROWS = "lora_embedding_A.rows"
A_INDICES = "lora_embedding_A.indices"
A_SHAPE = "lora_embedding_A.shape"
B_WEIGHT = "lora_embedding_B.weight"


def encode_rows(indices: torch.Tensor, rows: torch.Tensor, shape: tuple[int, int]) -> dict[str, torch.Tensor]:
    """On-disk form of A [V, r] from its touched rows: indices, rows and shape, or A whole when
    that is smaller."""
    num_rows, rank = shape
    sparse_bytes = indices.numel() * (indices.element_size() + rank * rows.element_size())
    if sparse_bytes >= num_rows * rank * rows.element_size():
        dense = torch.zeros(num_rows, rank, dtype=rows.dtype, device=rows.device).index_copy_(0, indices, rows)
        return {A_DENSE: dense}
    return {A_INDICES: indices, A_ROWS: rows, A_SHAPE: torch.tensor([num_rows, rank])}


def decode_rows(state: dict[str, torch.Tensor]) -> torch.Tensor:
    """A [V, r] whole from either on-disk form of :func:`encode_rows` (checked by
    :func:`check_encoded_adapter`)."""
    if A_DENSE in state:
        return state[A_DENSE]
    rows = state[A_ROWS]
    dense = rows.new_zeros(tuple(int(v) for v in state[A_SHAPE]))
    return dense.index_copy_(0, state[A_INDICES].to(rows.device), rows)


def check_encoded_adapter(state: dict, shape: tuple[int, int], b_shape, *, source: str, name: str) -> None:
    """Raise AdapterStateError naming the first key of ``state`` (named ``<name>.<key>`` in the
    message, ``name`` being the adapted table's) that does not fit an adapter with A of ``shape``
    [V, r] and B of ``b_shape``, in either on-disk form of :func:`encode_rows`: first the keys, then
    the saved table shape, the indices (1-D int64, in [0, V)) and every tensor's shape."""
    shown, where = f"{name}.", f"{name}.lora_embedding_A"
    dense = A_DENSE in state
    check_state_keys(
        state,
        (A_DENSE, B_WEIGHT) if dense else (A_INDICES, A_ROWS, A_SHAPE, B_WEIGHT),
        where=source,
        prefix=shown,
        error=AdapterStateError,
    )
    shapes = partial(check_state_shapes, state, where=source, prefix=shown, error=AdapterStateError)
    if dense:
        shapes({A_DENSE: shape, B_WEIGHT: b_shape})
        return
    shapes({A_SHAPE: (2,)})
    saved_shape = tuple(int(v) for v in state[A_SHAPE])
    if saved_shape != tuple(shape):
        raise AdapterStateError(
            f"{source}: {where} was saved for a table of shape {saved_shape} but the model's is {tuple(shape)}"
        )
    indices = state[A_INDICES]
    if indices.dtype != torch.int64 or indices.dim() != 1:
        raise AdapterStateError(f"{source}: {where}.indices must be 1-D int64")
    shapes({A_ROWS: (indices.numel(), shape[1]), B_WEIGHT: b_shape})
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= shape[0]):
        raise AdapterStateError(f"{source}: {where}.indices holds rows outside [0, {shape[0]})")


class LoraTableLayer(LoraWeightLayer):
    """Shared part of :class:`LoraEmbedding` and :class:`LoraEmbeddingBag`.

    ``validate_ids`` (default True): every forward checks that the ids lie in [0, V) and raises
    an IndexError naming the table and the first bad id. The check reads the ids back to the
    host (a device sync on GPU); set it to False on a layer whose input is trusted. Then nothing
    checks the range: an out-of-range id makes torch raise (CPU) or assert on the device (CUDA)
    on the torch path, and makes the fused Triton kernel read arbitrary memory — garbage output
    or an illegal-address fault, silently.

    On the Triton path (:func:`recpeft.kernels.dispatch.uses_triton`) the fused op pools E
    itself, in the same pass as the first adapter's A, so the base layer is not run; its fp32
    pooling order differs from torch's, so a zero adapter matches the base output to rounding,
    not bit for bit (the torch path keeps bit-identity).
    """

    validate_ids: bool = True

    def adapter_shapes(self, r):
        num_embeddings, dim = self.base_weight.shape
        return (num_embeddings, r), (r, dim)

    def reset_adapter(self, adapter, init):
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        nn.init.normal_(b)
        if init is False:
            nn.init.normal_(a, std=1.0 / a.shape[1])
        else:
            nn.init.zeros_(a)

    def touched_rows(self, adapter: str) -> torch.Tensor:
        """Indices of the rows of A that are not all zero (the rows training has updated)."""
        return (self.lora_A[adapter] != 0).any(dim=1).nonzero().squeeze(1)

    def sparse_parameters(self, adapter):
        """[A]: its gradient holds the rows of the batch's ids only."""
        return [self.lora_A[adapter]]

    def untouched_parameters(self, adapter):
        """Entries of A in rows still all zero: (V − touched rows)·r."""
        a = self.lora_A[adapter]
        return a.numel() - self.touched_rows(adapter).numel() * a.shape[1]

    def adapter_factors(self, adapter):
        """{"": A's touched rows [n, r] with their indices, B [r, D], s} (Δ[rows] = s·A·B)."""
        rows = self.touched_rows(adapter)
        a, b = self.lora_A[adapter].detach(), self.lora_B[adapter].detach()
        return {"": AdapterFactors(a[rows], b, self.scaling[adapter], rows)}

    @torch.no_grad()
    def set_adapter_factors(self, adapter, factors):
        """A ← zero but the listed rows; B ← B."""
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        check_factors(self.module_name, factors, {"": ((None, a.shape[1]), b.shape, self.scaling[adapter])})
        f = factors[""]
        a.zero_().index_copy_(0, f.rows.to(a.device), f.lora_A.to(a.device, a.dtype))
        b.copy_(f.lora_B)

    def merge_delta(self, adapter, sign):
        rows = self.touched_rows(adapter)
        padding = getattr(self.base_layer, "padding_idx", None)
        if padding is not None:  # a padding id gets no delta, merged or not
            rows = rows[rows != padding]
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        delta = merge_product(a[rows], b, sign * self.scaling[adapter], self.base_weight.dtype)
        self.base_weight.index_add_(0, rows, delta)

    # ---- forward ---------------------------------------------------------------------------

    def fuses_base_lookup(self) -> bool:
        """True when the active adapters run through the fused Triton op, which pools E itself
        (the caller then passes base_output=None to :meth:`add_adapter_output`)."""
        return (
            self.active_routing() is None
            and bool(self.pending_adapters())
            and dispatch.uses_triton("lora_embedding_bag", self.base_weight)
        )

    def add_adapter_output(
        self, layout: BagLayout, base_output: torch.Tensor | None, leading: int, rows_per_sample: int
    ):
        """base_output [nb, D] plus the active adapters' pooled deltas (or the routed ones).
        base_output None (only when :meth:`fuses_base_lookup`): the first adapter's fused op
        pools E too."""
        routing = self.active_routing()
        if routing is not None:
            bag_adapter = routing.row_adapter(self.module_name, leading, rows_per_sample, base_output.device)
            delta = dispatch.segmented_lora_bag_delta(
                layout, self.routed_adapters(routing), bag_adapter, base_output.shape[1], base_output.dtype
            )
            return base_output + delta
        out = base_output
        for adapter in self.pending_adapters():
            out = dispatch.lora_embedding_bag(
                self.base_weight, layout, self.lora_A[adapter], self.lora_B[adapter], self.scaling[adapter], out
            )
        return out

    # ---- on disk ---------------------------------------------------------------------------

    def export_adapter(self, adapter):
        """Touched rows of A with their indices when that is smaller than A, else A whole."""
        rows = self.touched_rows(adapter)
        a = self.lora_A[adapter].detach()
        return {**encode_rows(rows, a[rows], tuple(a.shape)), B_WEIGHT: self.lora_B[adapter].detach()}

    def check_adapter_state(self, adapter, tensors, source):
        check_encoded_adapter(
            tensors, tuple(self.lora_A[adapter].shape), self.lora_B[adapter].shape, source=source, name=self.module_name
        )

    @torch.no_grad()
    def load_adapter_state(self, adapter, tensors):
        a = self.lora_A[adapter]
        if A_DENSE in tensors:
            a.copy_(tensors[A_DENSE])
        else:
            a.zero_()
            a.index_copy_(0, tensors[A_INDICES].to(a.device), tensors[A_ROWS].to(a.device, a.dtype))
        self.lora_B[adapter].copy_(tensors[B_WEIGHT])
