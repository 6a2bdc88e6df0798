"""LoRA around ``nn.Linear``."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from recpeft.kernels import dispatch
from recpeft.kernels.reference import list_facts

from . import dora
from .adapter_state import check_adapter_tensors
from .base import AdapterFactors, check_factors, merge_product
from .weight import LoraWeightLayer


class LoraLinear(dora.DoraLayer, LoraWeightLayer):
    """y = x·Wᵀ + b + Σ_a s_a·(d(x)·A_aᵀ)·B_aᵀ over the active adapters a, with W frozen.

    A_a [r, K], B_a [N, r], s_a = α/r (α/√r with rsLoRA), d = dropout (training only).
    Input [..., K] of any leading shape; with per-sample routing the leading dimension is the
    samples. The op and its gradients are :func:`recpeft.kernels.dispatch.lora_linear`. DoRA
    adapters: :mod:`recpeft.layers.dora`.

    Example::

        layer = LoraLinear(nn.Linear(64, 32), "fc")
        layer.update_layer("default", r=8, scale=2.0, dropout=0.0, init=True)
        layer.active_adapters = ["default"]
        y = layer(torch.randn(16, 64))          # [16, 32]
    """

    HF_PEFT_LAYOUT = True  # lora_A.weight [r, K], lora_B.weight [N, r]: HF PEFT's keys and shapes

    # ---- DoRA (:class:`recpeft.layers.dora.DoraLayer`) -------------------------------------

    def dora_matrices(self, adapter, cast=dora.identity):
        return cast(self.base_layer.weight), cast(self.lora_A[adapter]), cast(self.lora_B[adapter])

    def delta_weight(self, adapter, scale):
        """scale·B·A [N, K] in W's dtype."""
        return merge_product(self.lora_B[adapter], self.lora_A[adapter], scale, self.base_weight.dtype)

    def weight_gain_shape(self):
        return (-1, 1)

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
            self.refuse_dora_routing(routing)
            return self._routed(x, weight, bias, routing, cast)
        if any(self.is_dora(a) for a in pending):
            return self._dora_forward(x, weight, bias, pending, cast)
        lora_A, lora_B, scale, dropout = self._combined(pending)
        return self._lora_op(x, weight, bias, cast(lora_A), cast(lora_B), scale, dropout)

    def _lora_op(self, x, weight, bias, lora_A, lora_B, scale, dropout):
        """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ, fused."""
        return dispatch.lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout)

    def _routed(self, x, weight, bias, routing, cast):
        """y_i = x_i·Wᵀ + b + s_a·(d(x_i)·A_aᵀ)·B_aᵀ, a the adapter routed to sample i."""
        if x.dim() < 2:
            raise ValueError(f"{self.module_name}: per-sample routing needs input [B, ..., K], got {tuple(x.shape)}")
        row_adapter = routing.row_adapter(self.module_name, x.shape[0], math.prod(x.shape[1:-1]), x.device)
        adapters = self.routed_adapters(routing)
        if x.dtype != weight.dtype or list_facts(adapters).dtypes - {x.dtype}:
            adapters = [  # a list of this call's own: its facts and stacks are not kept
                a if a is None else dataclasses.replace(a, lora_A=cast(a.lora_A), lora_B=cast(a.lora_B))
                for a in adapters
            ]
        y = dispatch.segmented_lora_linear(x.reshape(-1, x.shape[-1]), weight, bias, adapters, row_adapter)
        return y.view(*x.shape[:-1], y.shape[-1])

    def _dora_forward(self, x, weight, bias, adapters, cast):
        """x·Wᵀ + b plus each active adapter's term: DoRA's (:func:`recpeft.layers.dora.combine`)
        or plain LoRA's s·(d(x)·Aᵀ)·Bᵀ, in PyTorch ops (no fused kernel for DoRA yet)."""
        y, base = self._frozen_output(x, weight, bias)  # x·Wᵀ once, reused by every DoRA term without dropout
        for a in adapters:
            p = self.lora_dropout[a] if self.training else 0.0
            dropped = nn.functional.dropout(x, p, training=True) if p > 0 else x
            lora = self._lora_product(dropped, cast(self.lora_A[a]), cast(self.lora_B[a])) * self.scaling[a]
            if self.is_dora(a):
                product = base if dropped is x else self._frozen_output(dropped, weight, None)[1]
                y = y + dora.combine(self._output_gain(self.dora_gain(a, cast)), product, lora)
            else:
                y = y + lora
        return y

    def _frozen_output(self, x, weight, bias):
        """(x·Wᵀ + b, x·Wᵀ)."""
        base = nn.functional.linear(x, weight)
        return (base if bias is None else base + bias), base

    def _lora_product(self, x, lora_A, lora_B):
        """(x·Aᵀ)·Bᵀ."""
        return nn.functional.linear(nn.functional.linear(x, lora_A), lora_B)

    def _output_gain(self, g):
        """g [N] shaped to scale the output [..., N]."""
        return g

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
        """W ± s·B·A; for DoRA W ← g⊙(W + s·B·A) and back W ← W/g − s·B·A, g kept from the merge."""
        if self.is_dora(adapter):
            self.merge_dora(adapter, sign)
        else:
            self.base_weight.add_(self.delta_weight(adapter, sign * self.scaling[adapter]))

    def adapter_factors(self, adapter):
        """{"": A [r, K], B [N, r], s} (Δ = s·B·A); a DoRA adapter has none (its Δ is not B·A)."""
        if self.is_dora(adapter):
            raise ValueError(f"{self.module_name}: adapter {adapter!r} is a DoRA adapter; its update is not s·B·A")
        return {"": AdapterFactors(self.lora_A[adapter].detach(), self.lora_B[adapter].detach(), self.scaling[adapter])}

    @torch.no_grad()
    def set_adapter_factors(self, adapter, factors):
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        check_factors(self.module_name, factors, {"": (a.shape, b.shape, self.scaling[adapter])})
        a.copy_(factors[""].lora_A)
        b.copy_(factors[""].lora_B)

    def _state(self, adapter) -> dict[str, torch.Tensor]:
        """HF PEFT's keys: ``lora_A.weight`` A [r, K], ``lora_B.weight`` B [N, r], and for DoRA
        ``lora_magnitude_vector`` m [N]."""
        state = {"lora_A.weight": self.lora_A[adapter], "lora_B.weight": self.lora_B[adapter]}
        if self.is_dora(adapter):
            state[self.MAGNITUDE_KEY] = self.lora_magnitude_vector[adapter]
        return state

    def export_adapter(self, adapter):
        return {key: value.detach() for key, value in self._state(adapter).items()}

    def check_adapter_state(self, adapter, tensors, source):
        expected = {key: value.shape for key, value in self._state(adapter).items()}
        check_adapter_tensors(tensors, expected, source=source, prefix=f"{self.module_name}.")

    @torch.no_grad()
    def load_adapter_state(self, adapter, tensors):
        for key, value in self._state(adapter).items():
            value.copy_(tensors[key])
