"""DoRA (weight-decomposed LoRA, Liu et al. 2024): the math, as functions, and :class:`DoraLayer`,
the bookkeeping every wrapper with DoRA adapters shares (Linear, Conv1d/Conv2d, Embedding).

The math is stated once, for a matrix W ∈ R^{N×K} (frozen), A ∈ R^{r×K}, B ∈ R^{N×r}, s the LoRA
scale, m ∈ R^N the trained magnitude. The adapted weight is W' = diag(g)·(W + s·B·A) with
g = m / ‖W + s·B·A‖ (the L2 norm of each of the N rows, the paper's column norm of Wᵀ), the norm
treated as a constant: detached, so no gradient flows through it (the paper's §4.3, as HF PEFT
does). m starts at ‖W + s·B·A‖ row by row, so g starts at exactly 1 and the layer equal to the base
(B = 0, or A = 0 for a table). With x the layer's input, d(x) its dropout, base = d(x)·Wᵀ and
lora = s·(d(x)·Aᵀ)·Bᵀ:

    y = x·Wᵀ + b + (g − 1)⊙base + g⊙lora                         (:func:`combine`)

which is W'·x + b when d is the identity (inference, or p = 0). Merging writes W' into the
weights and keeps g to undo it: W ← W'/g − s·B·A.

Each layer maps its weight onto that matrix (:meth:`DoraLayer.dora_matrices`), as HF PEFT does:

- Linear: W [N, K], A [r, K], B [N, r] as they are; m [N].
- Conv: W [O, I, k…] flattened to [O, I·Πk], A [r, I, k…] to [r, I·Πk], B [O, r, 1…] to [O, r]:
  m holds one magnitude per output channel, the norm runs over (I, k…); m is kept in HF PEFT's
  shape [1, O, 1…].
- Embedding: the table E [V, D] is the linear map Eᵀ [D, V] of one-hot ids, so the matrix is Eᵀ,
  A_mat = Aᵀ [r, V], B_mat = Bᵀ [D, r] (Eᵀ + s·Bᵀ·Aᵀ = (E + s·A·B)ᵀ): m [D] holds one magnitude
  per embedding dimension and the norm runs over the V rows — HF PEFT's DoraEmbeddingLayer. With
  no dropout, out = g⊙(E[ids] + s·A[ids]·B). Each forward computes that norm over the whole
  table: V·D·r multiply-adds and a V×D temporary, as HF PEFT does.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import merge_product
from .routing import Routing

__all__ = ["DoraLayer", "combine", "identity", "magnitude_scale", "row_norms"]


def identity(t):
    """``cast`` when nothing is cast."""
    return t


def row_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row [N] of the matrices W [N, K], A [r, K], B [N, r], computed in float32 or
    wider and returned in W's dtype, detached."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    delta = merge_product(lora_B.detach(), lora_A.detach(), scale, compute)
    return torch.linalg.vector_norm(weight.detach().to(compute) + delta, dim=1).to(weight.dtype)


def magnitude_scale(
    magnitude: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖ [N]: differentiable in m, the norm a constant."""
    return magnitude / row_norms(weight, lora_A, lora_B, scale)


def combine(g: torch.Tensor, base: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """What one DoRA adapter adds to the frozen layer's output: (g − 1)⊙base + g⊙lora, with
    base = d(x)·Wᵀ (no bias) and lora = s·(d(x)·Aᵀ)·Bᵀ, g shaped to broadcast over the output."""
    return (g - 1) * base + g * lora


class DoraLayer:
    """DoRA adapters of a LoRA wrapper with one weight, mixed in before its
    :class:`~recpeft.layers.weight.LoraWeightLayer` base: ``lora_magnitude_vector[adapter]`` holds m
    (a parameter, saved under HF PEFT's key :attr:`MAGNITUDE_KEY`), a merged DoRA adapter keeps
    its g to be unmerged.

    The wrapper maps its weight onto the module docstring's matrices (:meth:`dora_matrices`),
    gives s·ΔW in its weight's shape (:meth:`delta_weight`) and the shape g takes against the
    weight (:meth:`weight_gain_shape`); all the rest is here.
    """

    #: file key of a DoRA adapter's magnitude m (HF PEFT's)
    MAGNITUDE_KEY = "lora_magnitude_vector"

    def __init__(self, base_layer: nn.Module, module_name: str):
        super().__init__(base_layer, module_name)
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self._merged_dora_scale: dict[str, torch.Tensor] = {}  # g [N] of each merged DoRA adapter

    # ---- the wrapper's side ----------------------------------------------------------------------

    def dora_matrices(self, adapter: str, cast=identity) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W, A, B) as the matrices [N, K], [r, K], [N, r] of the module docstring, each passed
        through ``cast`` (the autocast dtype, or unchanged)."""
        raise NotImplementedError

    def delta_weight(self, adapter: str, scale: float) -> torch.Tensor:
        """scale·ΔW in the shape and dtype of the frozen weight (ΔW = B·A in matrix form)."""
        raise NotImplementedError

    def weight_gain_shape(self) -> tuple[int, ...]:
        """The shape g [N] takes to scale the frozen weight (Linear (−1, 1))."""
        raise NotImplementedError

    def magnitude_shape(self) -> tuple[int, ...]:
        """The shape m is kept (and saved) in; default [N]."""
        return (-1,)

    # ---- adapters --------------------------------------------------------------------------------

    def enable_dora(self, adapter: str) -> None:
        """Make ``adapter`` a DoRA adapter: m starts at ‖W + s·B·A‖ per row, so the layer's output
        does not change."""
        norms = row_norms(*self.dora_matrices(adapter), self.scaling[adapter])
        self.lora_magnitude_vector[adapter] = nn.Parameter(norms.reshape(self.magnitude_shape()).clone())

    def is_dora(self, adapter: str) -> bool:
        return adapter in self.lora_magnitude_vector

    def adapter_parameters(self, adapter):
        """[A, B], and m for a DoRA adapter."""
        return super().adapter_parameters(adapter) + (
            [self.lora_magnitude_vector[adapter]] if self.is_dora(adapter) else []
        )

    def drop_adapter(self, adapter):
        super().drop_adapter(adapter)
        if adapter in self.lora_magnitude_vector:
            del self.lora_magnitude_vector[adapter]
        self._merged_dora_scale.pop(adapter, None)

    def dora_gain(self, adapter: str, cast=identity) -> torch.Tensor:
        """g = m / ‖W + s·B·A‖ [N] of ``adapter`` (differentiable in m)."""
        magnitude = cast(self.lora_magnitude_vector[adapter]).reshape(-1)
        return magnitude_scale(magnitude, *self.dora_matrices(adapter, cast), self.scaling[adapter])

    def adapter_factors(self, adapter):
        """A DoRA adapter has no factors: its update is not s·B·A."""
        if self.is_dora(adapter):
            raise ValueError(f"{self.module_name}: adapter {adapter!r} is a DoRA adapter; its update is not s·B·A")
        return super().adapter_factors(adapter)

    # ---- merging and routing ---------------------------------------------------------------------

    def merge_dora(self, adapter: str, sign: float) -> None:
        """sign > 0: W ← g⊙(W + s·ΔW), g kept; sign < 0: W ← W/g − s·ΔW with the kept g."""
        weight = self.base_weight
        shape = self.weight_gain_shape()
        if sign > 0:
            g = self.dora_gain(adapter).detach().clone()
            self._merged_dora_scale[adapter] = g
            weight.add_(self.delta_weight(adapter, self.scaling[adapter]))
            weight.mul_(g.view(shape))
            return
        weight.div_(self._merged_dora_scale.pop(adapter).view(shape))
        weight.add_(self.delta_weight(adapter, -self.scaling[adapter]))

    def check_merge(self, adapters: list[str]) -> None:
        """A DoRA adapter merges alone: g⊙(W + s·ΔW) equals the unmerged layer only for the W it
        was trained on, not for W with other deltas in it (nor they for a W scaled by g)."""
        super().check_merge(adapters)
        merging = [*self.merged_adapters, *adapters]
        dora_ones = [a for a in merging if self.is_dora(a)]
        if dora_ones and len(merging) > 1:
            raise ValueError(
                f"{self.module_name}: DoRA adapter {dora_ones[0]!r} merges alone, not with {merging}; "
                "activate it alone to merge it"
            )

    def refuse_dora_routing(self, routing: Routing) -> None:
        """Raise ValueError when ``routing`` sends samples through a DoRA adapter held here."""
        if not len(self.lora_magnitude_vector):  # no DoRA adapter here: nothing to look up
            return
        dora_routed = [n for n in routing.adapter_names if self.has_adapter(n) and self.is_dora(n)]
        if dora_routed:
            raise ValueError(
                f"{self.module_name}: per-sample routing does not support DoRA adapters ({dora_routed}); "
                "run them one at a time or merge one"
            )
