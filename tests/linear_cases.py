"""Inputs and the float64 oracle of the LoRA linear op, shared by the kernel tests."""

from __future__ import annotations

import torch

from reference_math import leaf64, naive_lora_linear


def make_inputs(m, k, n, r, dtype, device, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(device)  # noqa: E731
    return {
        "x": rnd(m, k),
        "weight": rnd(n, k),
        "bias": rnd(n) if bias else None,
        "lora_A": rnd(r, k),
        "lora_B": rnd(n, r),
        "grad_y": rnd(m, n),
    }


def oracle(inp, scale, keep_scale):
    """Float64 y, dX, dA, dB, db and u of the naive formula, and the same on absolute values
    (the error bound); keep_scale is the dropout multiplier m (None without dropout)."""

    def run(absolute):
        f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
        x, W, A, B = (leaf64(f(inp[name])) for name in ("x", "weight", "lora_A", "lora_B"))
        b = leaf64(f(inp["bias"])) if inp["bias"] is not None else None
        mask = keep_scale.double() if keep_scale is not None else None
        s = abs(scale) if absolute else scale
        y = naive_lora_linear(x, W, b, A, B, s, mask)
        y.backward(f(inp["grad_y"]))
        u = (x if mask is None else x * mask).detach() @ A.detach().t()
        return {
            "y": y.detach(),
            "x": x.grad,
            "lora_A": A.grad,
            "lora_B": B.grad,
            "bias": b.grad if b is not None else None,
            "u": u,
        }

    return run(False), run(True)
