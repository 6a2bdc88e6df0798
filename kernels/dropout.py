"""The adapters' dropout: one mask per forward, kept for backward."""

from __future__ import annotations

import torch


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted-dropout mask: Bernoulli(1 − p) draws from torch's default generator, scaled by
    1/(1 − p); d(x) = x ⊙ mask. Drawn once in forward and saved for backward."""
    return torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)
