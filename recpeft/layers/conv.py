"""LoRA around ``nn.Conv1d`` and ``nn.Conv2d`` (groups = 1), as HF PEFT defines it.

A convolution is a linear map of input patches: with k… its kernel, W [O, I, k…] acts on each
patch as the matrix W_mat = W.flatten(1) [O, I·Πk]. LoRA on that matrix is A [r, I, k…] — a
convolution like the base's (kernel, stride, padding, dilation, padding mode), I → r channels —
followed by B [O, r, 1…], a pointwise convolution r → O. Since B is pointwise,
B(A(x)) = conv(x; B⊗A) with (B⊗A)[o, i, k…] = Σ_r B[o, r]·A[r, i, k…] (B_mat·A_mat reshaped),
so the adapted layer is the merged convolution:

    y = conv(x; W) + b + Σ_a s_a·B_a(A_a(d(x))) = conv(x; W + Σ_a s_a·B_a⊗A_a) + b   (d the identity)

Everything else is LoraLinear's on the matrix form: the init (A Kaiming-uniform, B zero), several
active adapters as one (A stacked along r, B side by side), DoRA (m per output channel, the norm
over (I, k…), :mod:`recpeft.layers.dora`), the file keys and shapes (HF PEFT's: ``lora_A.weight``
[r, I, k…], ``lora_B.weight`` [O, r, 1…], ``lora_magnitude_vector`` [1, O, 1…]).

HF PEFT builds A with the base's kernel, stride and padding but not its dilation or padding mode;
recpeft keeps both, so that the adapter is the merged delta (for a dilated or non-zero-padded
base HF PEFT's own forward and merge disagree; files still move between them).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from recpeft.kernels import group_by_adapter

from . import dora
from .base import check_factors, merge_product
from .linear import LoraLinear

#: the weight's number of dimensions → the functional convolution B runs as (pointwise)
_POINTWISE = {3: F.conv1d, 4: F.conv2d}


class LoraConv(LoraLinear):
    """y = conv(x; W) + b + Σ_a s_a·B_a(A_a(d(x))) over the active adapters a, W frozen
    (module docstring): A_a [r, I, k…] a convolution like the base's, B_a [O, r, 1…] pointwise,
    s_a = α/r (α/√r with rsLoRA), d = dropout (training only).

    Input [B, I, L] (Conv1d) or [B, I, H, W] (Conv2d), or unbatched as the base takes it; output
    as the base's. With per-sample routing the input must be batched: sample i runs through its
    adapter a_i, y_i = conv(x_i; W) + b + s_{a_i}·B_{a_i}(A_{a_i}(d(x_i))). groups > 1 is refused.

    Example::

        layer = LoraConv(nn.Conv2d(3, 16, 3, padding=1), "stem")
        layer.update_layer("default", r=4, scale=2.0, dropout=0.0, init=True)
        layer.active_adapters = ["default"]
        y = layer(torch.randn(8, 3, 32, 32))          # [8, 16, 32, 32]
    """

    @staticmethod
    def check_supported(module: nn.Module, name: str) -> None:
        if module.groups != 1:
            raise ValueError(
                f"{name}: {type(module).__name__} with groups={module.groups}; LoRA on a convolution needs groups=1"
            )

    def adapter_shapes(self, r):
        out_channels, in_channels, *kernel = self.base_weight.shape
        return (r, in_channels, *kernel), (out_channels, r, *(1 for _ in kernel))

    # ---- the matrix form (DoRA, merging, factors) ------------------------------------------

    def dora_matrices(self, adapter, cast=dora.identity):
        """W [O, I·Πk], A [r, I·Πk], B [O, r]."""
        return tuple(cast(t).flatten(1) for t in (self.base_weight, self.lora_A[adapter], self.lora_B[adapter]))

    def delta_weight(self, adapter, scale):
        """scale·B⊗A [O, I, k…] in W's dtype."""
        weight = self.base_weight
        product = merge_product(self.lora_B[adapter].flatten(1), self.lora_A[adapter].flatten(1), scale, weight.dtype)
        return product.view(weight.shape)

    def _spatial(self) -> tuple[int, ...]:
        """(1, …) for the spatial dimensions: a per-channel vector broadcasts over [..., O, L…]."""
        return (1,) * (self.base_weight.dim() - 2)

    def weight_gain_shape(self):
        return (-1, 1, *self._spatial())

    def magnitude_shape(self):
        """[1, O, 1…]: HF PEFT's."""
        return (1, -1, *self._spatial())

    def _output_gain(self, g):
        return g.view(-1, *self._spatial())

    def adapter_factors(self, adapter):
        """{"": A [r, I·Πk], B [O, r], s} on the matrix form (Δ = s·B·A, ΔW its reshape)."""
        factors = super().adapter_factors(adapter)
        return {
            part: dataclasses.replace(f, lora_A=f.lora_A.flatten(1), lora_B=f.lora_B.flatten(1))
            for part, f in factors.items()
        }

    @torch.no_grad()
    def set_adapter_factors(self, adapter, factors):
        a, b = self.lora_A[adapter], self.lora_B[adapter]
        check_factors(self.module_name, factors, {"": (a.flatten(1).shape, b.flatten(1).shape, self.scaling[adapter])})
        a.copy_(factors[""].lora_A.view(a.shape))
        b.copy_(factors[""].lora_B.view(b.shape))

    # ---- forward (LoraLinear.forward runs these) -------------------------------------------

    def _frozen_output(self, x, weight, bias):
        """(conv(x; W) + b, conv(x; W)): the base's own op, the bias taken off again."""
        y = self.base_layer._conv_forward(x, weight, bias)
        return y, (y if bias is None else y - bias.view(-1, *self._spatial()))

    def _lora_product(self, x, lora_A, lora_B):
        """B(A(x)): A with the base's geometry and padding mode, B pointwise."""
        return _POINTWISE[self.base_weight.dim()](self.base_layer._conv_forward(x, lora_A, None), lora_B)

    def _lora_op(self, x, weight, bias, lora_A, lora_B, scale, dropout):
        dropped = F.dropout(x, dropout, training=True) if dropout > 0 else x
        return self.base_layer._conv_forward(x, weight, bias) + self._lora_product(dropped, lora_A, lora_B) * scale

    def _routed(self, x, weight, bias, routing, cast):
        """Samples grouped by adapter (one sort); each group's delta is added to its rows."""
        if x.dim() != self.base_weight.dim():
            raise ValueError(
                f"{self.module_name}: per-sample routing needs batched input [B, C, ...], got {tuple(x.shape)}"
            )
        sample_adapter = routing.row_adapter(self.module_name, x.shape[0], 1, x.device)
        adapters = self.routed_adapters(routing)
        y = self.base_layer._conv_forward(x, weight, bias)
        for a, rows in group_by_adapter(sample_adapter, len(adapters)):
            adapter = adapters[a]
            if adapter is None:
                continue
            x_a = x.index_select(0, rows)
            if adapter.dropout_p > 0:
                x_a = F.dropout(x_a, adapter.dropout_p, training=True)
            delta = self._lora_product(x_a, cast(adapter.lora_A), cast(adapter.lora_B)) * adapter.scale
            y.index_add_(0, rows, delta)
        return y
