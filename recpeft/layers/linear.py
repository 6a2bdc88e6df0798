"""LoRA around ``nn.Linear``."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from recpeft.kernels import dispatch

from .adapter_state import check_adapter_tensors
from .base import merge_product
from .weight import LoraWeightLayer


class LoraLinear(LoraWeightLayer):
    """y = x·Wᵀ + b + Σ_a s_a·(d(x)·A_aᵀ)·B_aᵀ over the active adapters a, with W frozen.

    A_a [r, K], B_a [N, r], s_a = α/r (α/√r with rsLoRA), d = dropout (training only).
    Input [..., K] of any leading shape; with per-sample routing the leading dimension is the
    samples. The op and its gradients are :func:`recpeft.kernels.dispatch.lora_linear`.

    Example::

        layer = LoraLinear(nn.Linear(64, 32), "fc")
        layer.update_layer("default", r=8, scale=2.0, dropout=0.0, init=True)
        layer.active_adapters = ["default"]
        y = layer(torch.randn(16, 64))          # [16, 32]
    """

    HF_PEFT_LAYOUT = True  # lora_A.weight [r, K], lora_B.weight [N, r]: HF PEFT's keys and shapes

    def adapter_shapes(self, r):
        out_features, in_features = self.base_weight.shape
        return (r, in_features), (out_features, r)

    def reset_adapter(self, adapter, init):
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        if init == "gaussian":
            nn.init.normal_(a, std=1.0 / a.shape[0])
        else:
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        if init is False:
            nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        else:
            nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        routing = self.active_routing()
        pending = self.pending_adapters()
        if routing is None and not pending:
            return self.base_layer(x)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the adapter op runs in the autocast dtype, as F.linear would
            with torch.autocast(device, enabled=False):
                return self._adapted(x, routing, pending, torch.get_autocast_dtype(device))
        return self._adapted(x, routing, pending, None)

    def _adapted(self, x, routing, pending, dtype):
        cast = (lambda t: t) if dtype is None else (lambda t: t if t is None else t.to(dtype))
        x, weight, bias = cast(x), cast(self.base_layer.weight), cast(self.base_layer.bias)
        if x.dtype != weight.dtype:
            raise TypeError(f"{self.module_name}: input dtype {x.dtype} does not match the layer's {weight.dtype}")
        if routing is not None:
            if x.dim() < 2:
                raise ValueError(
                    f"{self.module_name}: per-sample routing needs input [B, ..., K], got {tuple(x.shape)}"
                )
            row_adapter = routing.row_adapter(self.module_name, x.shape[0], math.prod(x.shape[1:-1]), x.device)
            adapters = [
                a if a is None else dataclasses.replace(a, lora_A=cast(a.lora_A), lora_B=cast(a.lora_B))
                for a in self.routed_adapters(routing)
            ]
            y = dispatch.segmented_lora_linear(x.reshape(-1, x.shape[-1]), weight, bias, adapters, row_adapter)
            return y.view(*x.shape[:-1], y.shape[-1])
        lora_A, lora_B, scale, dropout = self._combined(pending)
        return dispatch.lora_linear(x, weight, bias, cast(lora_A), cast(lora_B), scale, dropout)

    def _combined(self, adapters: list[str]):
        """One (A, B, s, p) for the active adapters: Σ_a s_a·B_a·A_a = [B_1 s_1 | B_2 s_2]·[A_1; A_2];
        p is the dropout in force (0 outside training)."""
        dropouts = {self.lora_dropout[a] if self.training else 0.0 for a in adapters}
        if len(dropouts) > 1:
            raise ValueError(
                f"{self.module_name}: active adapters {adapters} must share one lora_dropout to train together"
            )
        if len(adapters) == 1:
            a = adapters[0]
            return self.lora_A[a], self.lora_B[a], self.scaling[a], dropouts.pop()
        lora_A = torch.cat([self.lora_A[a] for a in adapters], 0)
        lora_B = torch.cat([self.lora_B[a] * self.scaling[a] for a in adapters], 1)
        return lora_A, lora_B, 1.0, dropouts.pop()

    def merge_delta(self, adapter, sign):
        weight, scale = self.base_layer.weight, sign * self.scaling[adapter]
        weight.add_(merge_product(self.lora_B[adapter], self.lora_A[adapter], scale, weight.dtype))

    def export_adapter(self, adapter):
        """``lora_A.weight`` A [r, K] and ``lora_B.weight`` B [N, r], HF PEFT's keys."""
        return {"lora_A.weight": self.lora_A[adapter].detach(), "lora_B.weight": self.lora_B[adapter].detach()}

    def check_adapter_state(self, adapter, tensors, source):
        expected = {"lora_A.weight": self.lora_A[adapter].shape, "lora_B.weight": self.lora_B[adapter].shape}
        check_adapter_tensors(tensors, expected, source=source, prefix=f"{self.module_name}.")

    @torch.no_grad()
    def load_adapter_state(self, adapter, tensors):
        self.lora_A[adapter].copy_(tensors["lora_A.weight"])
        self.lora_B[adapter].copy_(tensors["lora_B.weight"])
