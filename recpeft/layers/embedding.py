"""LoRA around ``nn.Embedding``."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..kernels import unpooled_layout, validate_ids
from .table import LoraTableLayer


class LoraEmbedding(LoraTableLayer):
    """out[..., :] = E[ids] + Σ_a s_a·A_a[ids]·B_a with E [V, D] frozen, A_a [V, r], B_a [r, D].

    ids of any shape [B, ...] (int32/int64); output [B, ..., D]. padding_idx ids keep the base
    row and get no delta. With per-sample routing the leading dimension of ids is the samples.
    The gradient of A is sparse (rows of the looked-up ids only).

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
        validate_ids(ids, self.base_weight.shape[0], self.module_name)
        base = self.base_layer(ids)
        if not self.has_adapter_work():
            return base
        if ids.dim() == 0:
            ids, base = ids.reshape(1), base.reshape(1, -1)
        layout = unpooled_layout(ids, self.base_layer.padding_idx)
        flat = base.reshape(-1, base.shape[-1])
        out = self.add_adapter_output(layout, flat, ids.shape[0], math.prod(ids.shape[1:]))
        return out.view(base.shape)
