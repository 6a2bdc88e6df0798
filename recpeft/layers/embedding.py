"""LoRA (and DoRA) around ``nn.Embedding``."""

from __future__ import annotations

import math

import torch
from torch import nn

from recpeft.kernels import dispatch, unpooled_layout, validate_ids
from recpeft.kernels.bags import check_id_dtype

from . import dora
from .adapter_holder import AdapterStateError
from .adapter_state import check_adapter_tensors
from .base import merge_product
from .table import A_DENSE, B_WEIGHT, LoraTableLayer, decode_rows

#: HF PEFT's file keys of an Embedding adapter: A as [r, V], B as [D, r] (recpeft's transposed)
HF_A, HF_B = "lora_embedding_A", "lora_embedding_B"


class LoraEmbedding(dora.DoraLayer, LoraTableLayer):
    """out[..., :] = E[ids] + Σ_a s_a·A_a[ids]·B_a with E [V, D] frozen, A_a [V, r], B_a [r, D].

    ids of any shape [B, ...] (int32/int64); output [B, ..., D]. padding_idx ids keep the base
    row and get no delta. An adapter with new rows (:meth:`add_new_rows`) also takes ids
    V … V + n − 1: E[new-id row] + s·A[i]·B. With per-sample routing the leading dimension of ids is the samples.
    The gradient of A is sparse (rows of the looked-up ids only). ``validate_ids`` and the fused
    Triton path: see :class:`~recpeft.layers.table.LoraTableLayer`.

    DoRA (HF PEFT's DoraEmbeddingLayer, :mod:`recpeft.layers.dora`): the table is the linear map
    Eᵀ [D, V] of one-hot ids, so m [D] holds one magnitude per embedding dimension and
    g = m / ‖E + s·A·B‖, the norm over the V rows of each column (detached); the adapter's output is
    out = E[ids] + (g − 1)⊙E[ids] + g⊙(s·A[ids]·B) = g⊙(E[ids] + s·A[ids]·B). The padding row gets
    no delta here either (A's padding row counts as zero, in the norm too), so a padding id returns
    g⊙E[padding_idx], which merging writes: E ← g⊙(E + s·A·B). Files: recpeft's table form plus
    ``lora_magnitude_vector`` [D] (HF PEFT's key and shape); HF PEFT's own Embedding keys
    (``lora_embedding_A`` [r, V], ``lora_embedding_B`` [D, r]) load too, and
    :meth:`hf_peft_tensors` writes them.

    Example::

        layer = LoraEmbedding(nn.Embedding(1000, 16), "item_emb")
        layer.update_layer("default", r=4, scale=1.0, dropout=0.0, init=True)
        layer.active_adapters = ["default"]
        out = layer(torch.randint(0, 1000, (8, 5)))   # [8, 5, 16]
    """

    @staticmethod
    def check_supported(module: nn.Embedding, name: str) -> None:
        if module.max_norm is not None:
            raise ValueError(f"{name}: nn.Embedding with max_norm renormalises its table in place; LoRA cannot wrap it")

    # ---- DoRA (:class:`recpeft.layers.dora.DoraLayer`): the matrix Eᵀ [D, V] -------------------

    def _delta_rows(self, adapter: str) -> torch.Tensor:
        """A [V, r] with the padding row zero (the rows that get a delta)."""
        a = self.lora_A[adapter]
        padding = self.base_layer.padding_idx
        return a if padding is None else a.index_fill(0, torch.tensor([padding], device=a.device), 0)

    def dora_matrices(self, adapter, cast=dora.identity):
        """Eᵀ [D, V], Aᵀ [r, V], Bᵀ [D, r]."""
        return cast(self.base_weight).t(), cast(self._delta_rows(adapter)).t(), cast(self.lora_B[adapter]).t()

    def delta_weight(self, adapter, scale):
        """scale·A·B [V, D] (the padding row zero) in E's dtype."""
        return merge_product(self._delta_rows(adapter), self.lora_B[adapter], scale, self.base_weight.dtype)

    def weight_gain_shape(self):
        return (1, -1)

    def merge_delta(self, adapter, sign):
        """DoRA: E ← g⊙(E + s·A·B) and back; plain LoRA: the touched rows only (the table's)."""
        if self.is_dora(adapter):
            self.merge_dora(adapter, sign)
        else:
            super().merge_delta(adapter, sign)

    # ---- forward ---------------------------------------------------------------------------

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.validate_ids:
            validate_ids(ids, self.id_limit(), self.module_name)
        else:
            check_id_dtype(ids, self.module_name)
        if not self.has_adapter_work():
            return self.base_layer(ids)
        out_shape = (*ids.shape, self.base_weight.shape[1])
        if ids.dim() == 0:
            ids = ids.reshape(1)
        padding_idx = self.base_layer.padding_idx
        layout = unpooled_layout(ids, padding_idx)
        routing = self.active_routing()
        if routing is not None:
            self.refuse_dora_routing(routing)
        with_dora = routing is None and any(self.is_dora(a) for a in self.pending_adapters())
        # The fused op pools E itself, except with a padding_idx: a padding id is an empty bag of
        # the layout (no delta) but nn.Embedding still returns E[padding_idx] there. DoRA needs E[ids].
        fused = padding_idx is None and not with_dora and self.fuses_base_lookup()
        base = None if fused else self.base_layer(self.base_table_ids(ids)).reshape(-1, out_shape[-1])
        if with_dora:
            out = self._dora_output(layout, base)
        else:
            out = self.add_adapter_output(layout, base, ids.shape[0], math.prod(ids.shape[1:]))
        return out.view(out_shape)

    def _dora_output(self, layout, base):
        """base = E[ids] plus each active adapter's term: s·A[ids]·B, or DoRA's
        (g − 1)⊙E[ids] + g⊙(s·A[ids]·B) (:func:`recpeft.layers.dora.combine`)."""
        out = base
        for a in self.pending_adapters():
            weights = (self.base_weight, layout, self.lora_A[a], self.lora_B[a], self.scaling[a])
            if self.is_dora(a):
                lora = dispatch.lora_embedding_bag(*weights, base) - base  # s·A[ids]·B, A's gradient sparse
                out = out + dora.combine(self.dora_gain(a), base, lora)
            else:
                out = dispatch.lora_embedding_bag(*weights, out)
        return out

    # ---- on disk ---------------------------------------------------------------------------

    def export_adapter(self, adapter):
        """The table's form, and m [D] as ``lora_magnitude_vector`` for a DoRA adapter."""
        state = super().export_adapter(adapter)
        if self.is_dora(adapter):
            state[self.MAGNITUDE_KEY] = self.lora_magnitude_vector[adapter].detach()
        return state

    def _from_hf_peft(self, adapter, tensors, source):
        """``tensors`` with HF PEFT's A [r, V] and B [D, r] (if present) in recpeft's dense form."""
        if HF_A not in tensors and HF_B not in tensors:
            return tensors
        prefix = f"{self.module_name}."
        clash = [k for k in (A_DENSE, B_WEIGHT) if k in tensors]
        if clash:
            raise AdapterStateError(
                f"{source}: {prefix}{clash[0]} beside HF PEFT's {prefix}{HF_A}: two forms of one adapter"
            )
        (num_embeddings, r), dim = self.lora_A[adapter].shape, self.base_weight.shape[1]
        hf = {k: tensors[k] for k in (HF_A, HF_B) if k in tensors}
        check_adapter_tensors(hf, {HF_A: (r, num_embeddings), HF_B: (dim, r)}, source=source, prefix=prefix)
        rest = {k: v for k, v in tensors.items() if k not in hf}
        return {**rest, A_DENSE: hf[HF_A].t(), B_WEIGHT: hf[HF_B].t()}

    def check_adapter_state(self, adapter, tensors, source):
        """The table's form or HF PEFT's (``lora_embedding_A`` [r, V], ``lora_embedding_B`` [D, r]),
        and for a DoRA adapter ``lora_magnitude_vector`` [D]."""
        tensors = dict(self._from_hf_peft(adapter, tensors, source))
        if self.is_dora(adapter):
            magnitude = {k: tensors.pop(k) for k in [self.MAGNITUDE_KEY] if k in tensors}
            expected = {self.MAGNITUDE_KEY: self.lora_magnitude_vector[adapter].shape}
            check_adapter_tensors(magnitude, expected, source=source, prefix=f"{self.module_name}.")
        super().check_adapter_state(adapter, tensors, source)

    @torch.no_grad()
    def load_adapter_state(self, adapter, tensors):
        tensors = self._from_hf_peft(adapter, tensors, source="")
        super().load_adapter_state(adapter, tensors)
        if self.is_dora(adapter):
            self.lora_magnitude_vector[adapter].copy_(tensors[self.MAGNITUDE_KEY])

    @staticmethod
    def hf_peft_tensors(tensors: dict[str, torch.Tensor], padding_idx: int | None = None) -> dict[str, torch.Tensor]:
        """One adapter's tensors as :meth:`export_adapter` gives them (either form of A) keyed as
        HF PEFT keys an Embedding's: ``lora_embedding_A`` Aᵀ [r, V], ``lora_embedding_B`` Bᵀ [D, r],
        ``lora_magnitude_vector`` m [D] as it is. A's ``padding_idx`` row is written as zero: HF
        PEFT adds A[padding_idx]·B to a padding id, recpeft adds nothing."""
        a = decode_rows(tensors).clone()
        if padding_idx is not None:
            a[padding_idx] = 0
        out = {HF_A: a.t().contiguous(), HF_B: tensors[B_WEIGHT].t().contiguous()}
        if dora.DoraLayer.MAGNITUDE_KEY in tensors:
            out[dora.DoraLayer.MAGNITUDE_KEY] = tensors[dora.DoraLayer.MAGNITUDE_KEY]
        return out
