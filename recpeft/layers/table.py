"""What the LoRA embedding and embedding-bag layers share: the adapter of a frozen table.

E [V, D] frozen; A [V, r] is itself a table of dimension r, B [r, D] dense; s the scale.
Looked-up rows become E[i] + s·A[i]·B, pooled bags Σ w_i·E[i] + s·(Σ w_i·A[i])·B.
A starts at zero and B random, so rows of A that no batch touched stay exactly zero: merging
adds s·A[rows]·B to those rows only, and the file stores only touched rows. An adapter may also
hold rows for ids past V, the segment's new ids (:mod:`recpeft.layers.new_rows`): A is then
[V + n, r] and those ids look up the table's new-id row plus their own s·A[i]·B.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from recpeft.kernels import BagLayout, dispatch
from recpeft.utils.validation import check_state_keys, check_state_shapes

from .adapter_holder import AdapterStateError
from .base import AdapterFactors, check_factors, merge_product
from .new_rows import NewRows, base_ids, check_routed_ids, grown_table, resolve_new_id_row
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

    def __init__(self, base_layer: nn.Module, module_name: str):
        super().__init__(base_layer, module_name)
        self.new_rows: dict[str, NewRows] = {}

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

    def drop_adapter(self, adapter):
        super().drop_adapter(adapter)
        self.new_rows.pop(adapter, None)

    # ---- new rows (recpeft.layers.new_rows) ----------------------------------------------------

    @torch.no_grad()
    def add_new_rows(self, adapter: str, count: int, new_id_row: int = -1) -> None:
        """Give ``adapter`` ``count`` rows of its own for ids V … V + count − 1, each starting as
        the table's new-id row ``new_id_row`` (negative: from the end; −1 is the encoder's reserved
        unseen id): A grows by ``count`` zero rows. Every adapter of a table names the same new-id
        row; DoRA adapters take no new rows."""
        num_rows = self.base_weight.shape[0]
        row = resolve_new_id_row(new_id_row, num_rows, self.module_name)
        if getattr(self, "is_dora", lambda _: False)(adapter):
            raise ValueError(
                f"{self.module_name}: a DoRA adapter takes no new rows (its norm is over the table's V rows)"
            )
        others = {r.new_id_row for a, r in self.new_rows.items() if a != adapter}
        if others - {row}:
            raise ValueError(f"{self.module_name}: new_id_row {row} but another adapter's new rows use {others.pop()}")
        a = self.lora_A[adapter]
        self.lora_A[adapter] = nn.Parameter(torch.cat([a.detach(), a.new_zeros(count, a.shape[1])]))
        self.new_rows[adapter] = NewRows(count, row)

    def _rows_in_play(self) -> list[NewRows]:
        """The new rows of the adapters this forward uses (routed, or active and unmerged); more
        than one unrouted is refused (id V + j would name two ids)."""
        if not self.new_rows:  # the usual table: nothing to scan, however many adapters are routed
            return []
        routing = self.active_routing()
        names = [n for n in routing.adapter_names if n in self.lora_A] if routing else self.pending_adapters()
        rows = [self.new_rows[n] for n in names if n in self.new_rows]
        if routing is None and len(rows) > 1:
            raise ValueError(
                f"{self.module_name}: two active adapters have new-id rows of their own; activate one, "
                "or route each sample to its adapter"
            )
        return rows

    def id_limit(self) -> int:
        """Ids this forward accepts: V, plus the largest new-row count in play."""
        return self.base_weight.shape[0] + max((r.count for r in self._rows_in_play()), default=0)

    def base_table_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """``ids`` as the frozen table looks them up: new rows' ids as the new-id row."""
        rows = self._rows_in_play()
        return base_ids(ids, self.base_weight.shape[0], rows[0].new_id_row) if rows else ids

    def _check_routed_new_ids(self, layout: BagLayout, bag_adapter: torch.Tensor, routing) -> None:
        """Each id past V lies within its own sample's adapter's new rows."""
        if not self.new_rows:
            return
        num_rows = self.base_weight.shape[0]
        counts = [self.new_rows[n].count if n in self.new_rows else 0 for n in routing.adapter_names]
        if self.validate_ids and any(counts):
            limits = torch.tensor([num_rows] + [num_rows + c for c in counts])
            id_adapter = bag_adapter.index_select(0, layout.bag_of_id.to(bag_adapter.device))
            check_routed_ids(layout.ids, id_adapter, limits, self.module_name, routing.adapter_names)

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

    def check_merge(self, adapters):
        """An adapter with new rows merges alone among the table's adapters with new rows: its
        merge extends the table, and another's ids V + j would then name its rows."""
        super().check_merge(adapters)
        growing = [a for a in adapters if a in self.new_rows]
        if growing and len(self.new_rows) > 1:
            raise ValueError(
                f"{self.module_name}: adapters {sorted(self.new_rows)} all have new-id rows; merging "
                f"{growing[0]!r} would extend the table under the others' ids (delete them first)"
            )

    def _set_table(self, table: torch.Tensor) -> None:
        """Replace the frozen table (merging new rows grows it; unmerging shrinks it back)."""
        self.base_layer.weight = nn.Parameter(table, requires_grad=False)
        self.base_layer.num_embeddings = table.shape[0]

    def merge_delta(self, adapter, sign):
        new = self.new_rows.get(adapter)
        if new is not None and sign > 0:
            self._set_table(grown_table(self.base_weight.detach(), new))
        self._merge_touched_rows(adapter, sign)
        if new is not None and sign < 0:
            self._set_table(self.base_weight.detach()[: -new.count].clone())

    def _merge_touched_rows(self, adapter, sign):
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
            and not self._rows_in_play()  # new ids look up the new-id row of E, not their own
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
            self._check_routed_new_ids(layout, bag_adapter, routing)
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
