"""Independent float64 formulas the tests compare against: written from DESIGN.md's math with
plain tensor ops and Python loops, sharing no code with recpeft."""

from __future__ import annotations

import torch


def naive_lora_linear(x, W, b, A, B, scale, keep_mask=None):
    """x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ with d(x) = x ⊙ keep_mask."""
    dropped = x if keep_mask is None else x * keep_mask
    y = x @ W.t() + (0 if b is None else b)
    return y + scale * (dropped @ A.t()) @ B.t()


def naive_bag(bags, E, A, B, scale, mode="sum", weights=None, padding_idx=None):
    """One output row per bag: Σ w_i·E[i] + s·(Σ w_i·A[i])·B; mean divides by the number of
    non-padding ids; padding ids contribute nothing; empty bags are zero."""
    rows = []
    for j, ids in enumerate(bags):
        kept = [(k, i) for k, i in enumerate(ids) if i != padding_idx]
        pooled_e = E.new_zeros(E.shape[1])
        pooled_a = A.new_zeros(A.shape[1])
        for k, i in kept:
            w = 1.0 if weights is None else weights[j][k]
            pooled_e = pooled_e + w * E[i]
            pooled_a = pooled_a + w * A[i]
        if mode == "mean" and kept:
            pooled_e, pooled_a = pooled_e / len(kept), pooled_a / len(kept)
        rows.append(pooled_e + scale * pooled_a @ B)
    return torch.stack(rows) if rows else E.new_zeros(0, E.shape[1])


def leaf64(t):
    return t.detach().double().requires_grad_(True)
