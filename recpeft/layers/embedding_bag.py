"""LoRA around ``nn.EmbeddingBag``."""

from __future__ import annotations

import torch
from torch import nn

from recpeft.kernels import bag_layout

from .table import LoraTableLayer


class LoraEmbeddingBag(LoraTableLayer):
    """pooled_j = Σ_{i∈I_j} w_i·E[i] + Σ_a s_a·(Σ_{i∈I_j} w_i·A_a[i])·B_a.

    Takes exactly what the wrapped ``nn.EmbeddingBag`` takes: 1-D ids with ``offsets`` (with or
    without include_last_offset), or 2-D [B, L] fixed-length bags; optional
    ``per_sample_weights`` (sum mode); sum or mean pooling; ``padding_idx``; empty bags pool to
    zero. Output [B, D], one row per bag (per sample when routing). The adapter pools in rank
    space first and its gradient touches only the rows of A in the batch
    (:func:`recpeft.kernels.dispatch.lora_embedding_bag`); an adapter with new rows
    (:meth:`add_new_rows`) also takes ids V … V + n − 1. ``validate_ids`` and the fused Triton path:
    see :class:`~recpeft.layers.table.LoraTableLayer`.

    Example::

        layer = LoraEmbeddingBag(nn.EmbeddingBag(1000, 16, mode="mean"), "bag")
        layer.update_layer("default", r=4, scale=1.0, dropout=0.0, init=True)
        layer.active_adapters = ["default"]
        out = layer(torch.tensor([1, 2, 3, 4]), torch.tensor([0, 3]))   # [2, 16]
    """

    @staticmethod
    def check_supported(module: nn.EmbeddingBag, name: str) -> None:
        if module.mode not in ("sum", "mean"):
            raise ValueError(f"{name}: LoRA needs a linear pooling (sum or mean); mode={module.mode!r} is not")
        if module.max_norm is not None:
            raise ValueError(
                f"{name}: nn.EmbeddingBag with max_norm renormalises its table in place; LoRA cannot wrap it"
            )

    def forward(
        self, input: torch.Tensor, offsets: torch.Tensor | None = None, per_sample_weights: torch.Tensor | None = None
    ) -> torch.Tensor:
        bag = self.base_layer
        layout = bag_layout(
            input,
            offsets,
            num_embeddings=self.id_limit(),
            mode=bag.mode,
            per_sample_weights=per_sample_weights,
            include_last_offset=bag.include_last_offset,
            padding_idx=bag.padding_idx,
            weight_dtype=self.base_weight.dtype,
            table_name=self.module_name,
            validate=self.validate_ids,
        )
        if not self.has_adapter_work():
            return bag(input, offsets, per_sample_weights)
        base = None if self.fuses_base_lookup() else bag(self.base_table_ids(input), offsets, per_sample_weights)
        return self.add_adapter_output(layout, base, layout.num_bags, 1)
