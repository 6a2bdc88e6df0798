"""LoRA around ``nn.Embedding``."""

from __future__ import annotations

import math

import torch
from torch import nn

from recpeft.kernels import unpooled_layout, validate_ids
from recpeft.kernels.bags import check_id_dtype

from .table import LoraTableLayer


class LoraEmbedding(LoraTableLayer):
    """out[..., :] = E[ids] + Σ_a s_a·A_a[ids]·B_a with E [V, D] frozen, A_a [V, r], B_a [r, D].

    ids of any shape [B, ...] (int32/int64); output [B, ..., D]. padding_idx ids keep the base
    row and get no delta. With per-sample routing the leading dimension of ids is the samples.
    The gradient of A is sparse (rows of the looked-up ids only). ``validate_ids`` and the fused
    Triton path: see :class:`~recpeft.layers.table.LoraTableLayer`.

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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.validate_ids:
            validate_ids(ids, self.base_weight.shape[0], self.module_name)
        else:
            check_id_dtype(ids, self.module_name)
        if not self.has_adapter_work():
            return self.base_layer(ids)
        out_shape = (*ids.shape, self.base_weight.shape[1])
        if ids.dim() == 0:
            ids = ids.reshape(1)
        padding_idx = self.base_layer.padding_idx
        layout = unpooled_layout(ids, padding_idx)
        # The fused op pools E itself, except with a padding_idx: a padding id is an empty bag of
        # the layout (no delta) but nn.Embedding still returns E[padding_idx] there.
        fused = padding_idx is None and self.fuses_base_lookup()
        base = None if fused else self.base_layer(ids).reshape(-1, out_shape[-1])
        out = self.add_adapter_output(layout, base, ids.shape[0], math.prod(ids.shape[1:]))
        return out.view(out_shape)
