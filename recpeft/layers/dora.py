"""DoRA (weight-decomposed LoRA, Liu et al. 2024) for a Linear layer: the math, as functions.

W ∈ R^{N×K} frozen, A ∈ R^{r×K}, B ∈ R^{N×r}, s the LoRA scale, m ∈ R^N the trained magnitude.
The adapted weight is W' = diag(g)·(W + s·B·A) with g = m / ‖W + s·B·A‖ (the L2 norm of each of
the N rows, the paper's column norm of Wᵀ), the norm treated as a constant: detached, so no
gradient flows through it (the paper's §4.3, as HF PEFT does). m starts at ‖W‖ row by row, so with
B = 0 the layer starts equal to the base. With x the layer's input and d(x) its dropout:

    y = x·Wᵀ + b + (g − 1)⊙(d(x)·Wᵀ) + g⊙(s·(d(x)·Aᵀ)·Bᵀ)

which is W'·x + b when d is the identity (inference, or p = 0). Merging writes W' into the
weights and keeps g to undo it: W ← W'/g − s·B·A.
"""

from __future__ import annotations

import torch


def row_norms(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """‖W + s·B·A‖ per row [N], computed in float32 or wider and returned in W's dtype, detached."""
    compute = torch.promote_types(weight.dtype, torch.float32)
    adapted = weight.detach().to(compute) + scale * (lora_B.detach().to(compute) @ lora_A.detach().to(compute))
    return torch.linalg.vector_norm(adapted, dim=1).to(weight.dtype)


def magnitude_scale(
    magnitude: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float
) -> torch.Tensor:
    """g = m / ‖W + s·B·A‖ [N]: differentiable in m, the norm a constant."""
    return magnitude / row_norms(weight, lora_A, lora_B, scale)


def dora_delta(
    dropped: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """What one DoRA adapter adds to x·Wᵀ + b: (g − 1)⊙(d(x)·Wᵀ) + g⊙(s·(d(x)·Aᵀ)·Bᵀ), with
    ``dropped`` = d(x) (x itself when no dropout runs); ``base``: d(x)·Wᵀ when the caller has it."""
    g = magnitude_scale(magnitude, weight, lora_A, lora_B, scale)
    base = torch.nn.functional.linear(dropped, weight) if base is None else base
    lora = torch.nn.functional.linear(torch.nn.functional.linear(dropped, lora_A), lora_B) * scale
    return (g - 1) * base + g * lora
