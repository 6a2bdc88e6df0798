"""LoraAdamW: AdamW for adapters, dense and sparse gradients alike.

Embedding adapters get sparse gradients (rows of the ids in the batch only), which
``torch.optim.AdamW`` refuses. For a parameter p with gradient g at step t (β1, β2, lr, λ):

    m ← β1·m + (1 − β1)·g,   v ← β2·v + (1 − β2)·g²
    p ← p − lr·( m/(1 − β1ᵗ) / (√(v/(1 − β2ᵗ)) + ε) + λ·p )

Dense gradients update every element (torch.optim.AdamW's rule). Sparse gradients update the
touched rows only ("lazy" Adam, as torch.optim.SparseAdam, with decoupled weight decay on those
rows): a row no batch touched keeps its value — zero for a fresh embedding adapter, which keeps
its file sparse — and its moments.
"""

from __future__ import annotations

import torch


class LoraAdamW(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        if lr <= 0 or eps <= 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(
                f"invalid LoraAdamW settings: lr={lr}, betas={betas}, eps={eps}, weight_decay={weight_decay}"
            )
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                correction1 = 1 - beta1 ** state["step"]
                correction2 = 1 - beta2 ** state["step"]
                grad = p.grad
                if grad.is_sparse:
                    grad = grad.coalesce()
                    rows, values = grad.indices()[0], grad.values()
                    m = state["exp_avg"].index_select(0, rows).mul_(beta1).add_(values, alpha=1 - beta1)
                    v = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
                    state["exp_avg"].index_copy_(0, rows, m)
                    state["exp_avg_sq"].index_copy_(0, rows, v)
                    updated = p.index_select(0, rows).mul_(1 - lr * decay)
                    updated.addcdiv_(m, (v / correction2).sqrt_().add_(eps), value=-lr / correction1)
                    p.index_copy_(0, rows, updated)
                else:
                    m, v = state["exp_avg"], state["exp_avg_sq"]
                    m.mul_(beta1).add_(grad, alpha=1 - beta1)
                    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    p.mul_(1 - lr * decay)
                    p.addcdiv_(m, (v / correction2).sqrt_().add_(eps), value=-lr / correction1)
        return loss
