"""LoRA linear, forward + backward, fp32 CPU: recpeft's LoraLinear against its floor and rivals.

Shape M=8192 rows, K=N=512, r=16, α=32 (s = 2), no dropout. Every variant computes the input
gradient dX (the layer sits inside a network); gradients are cleared (``.grad = None``) before
each call, outside the timed region.

    frozen   (a) nn.Linear with weight and bias frozen: y = base(x); y.backward(g) — the floor
    recpeft  (b) get_peft_model on a copy of a one-layer model (init_lora_weights=False: non-zero adapter)
    unfused  (c) HF-PEFT-style base(x) + lora_B(lora_A(x))·s with two trainable nn.Linear
    dense    (d) dense fine-tuning of a copy of the layer: weight and bias trainable

Before anything is timed the variants are checked against each other: recpeft and unfused give the
same y, dX, dA and dB; frozen and dense the same y and dX.

Target (reported, not asserted): recpeft/frozen ≤ 1.15x. DESIGN.md anchors on this machine:
HF PEFT 1.77x, dense fine-tuning 1.49x.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recpeft import LoraConfig
from recpeft.apps.workflow import Method, trainable_copy

M, K, N, R, ALPHA = 8192, 512, 512, 16, 32
ROUNDS = 30
INTERLEAVED_ROUNDS = 20

SUITE = {
    "name": "lora_linear",
    "title": f"LoRA linear fwd+bwd, fp32, M={M} K={K} N={N} r={R}",
    "shape": {"M": M, "K": K, "N": N, "r": R, "lora_alpha": ALPHA, "dropout": 0.0},
    "dtype": "float32",
    "floor": "frozen",
    "targets": {"recpeft": 1.15},
    "anchors": {
        "HF PEFT LoRA / frozen (DESIGN.md, 2 CPU cores)": "1.77x",
        "dense fine-tuning / frozen (DESIGN.md, 2 CPU cores)": "1.49x",
    },
}
VARIANTS = ["frozen", "recpeft", "unfused", "dense"]


class OneLayer(nn.Module):
    def __init__(self, layer: nn.Linear):
        super().__init__()
        self.fc = layer

    def forward(self, x):
        return self.fc(x)


def _clear(*tensors):
    def reset():
        for t in tensors:
            t.grad = None

    return reset


@pytest.fixture(scope="module")
def case(bench):
    torch.manual_seed(0)
    scale = ALPHA / R
    x = torch.randn(M, K, requires_grad=True)
    g = torch.randn(M, N)

    frozen = nn.Linear(K, N).requires_grad_(False)

    peft = trainable_copy(
        OneLayer(frozen), Method.LORA, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["fc"], init_lora_weights=False)
    )
    layer = peft.base_model.fc
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]  # [r, K], [N, r]
    assert peft.peft_config["default"].scale_for("fc") == scale

    unfused_A = nn.Linear(K, R, bias=False)
    unfused_B = nn.Linear(R, N, bias=False)
    with torch.no_grad():
        unfused_A.weight.copy_(lora_A)
        unfused_B.weight.copy_(lora_B)

    def unfused(inp):
        return frozen(inp) + unfused_B(unfused_A(inp)) * scale

    dense = trainable_copy(frozen, Method.DENSE)

    variants = {
        "frozen": bench.Variant("(a) frozen nn.Linear (floor)", lambda: frozen(x).backward(g), _clear(x)),
        "recpeft": bench.Variant("(b) recpeft LoraLinear", lambda: peft(x).backward(g), _clear(x, lora_A, lora_B)),
        "unfused": bench.Variant(
            "(c) unfused base + B(A(x))*s (HF PEFT)",
            lambda: unfused(x).backward(g),
            _clear(x, unfused_A.weight, unfused_B.weight),
        ),
        "dense": bench.Variant(
            "(d) dense fine-tuning", lambda: dense(x).backward(g), _clear(x, dense.weight, dense.bias)
        ),
    }

    # ---- the variants compute the same thing, checked before anything is timed ----
    def run(forward, *params):
        x.grad = None
        for p in params:
            p.grad = None
        y = forward(x)
        y.backward(g)
        return y.detach(), x.grad.clone(), [p.grad.clone() for p in params]

    y_frozen, dx_frozen, _ = run(frozen)
    y_dense, dx_dense, _ = run(dense, dense.weight, dense.bias)
    y_peft, dx_peft, (da_peft, db_peft) = run(peft, lora_A, lora_B)
    y_unf, dx_unf, (da_unf, db_unf) = run(unfused, unfused_A.weight, unfused_B.weight)
    bench.assert_close("dense y vs frozen y", y_dense, y_frozen)
    bench.assert_close("dense dX vs frozen dX", dx_dense, dx_frozen)
    bench.assert_close("recpeft y vs unfused y", y_peft, y_unf)
    bench.assert_close("recpeft dX vs unfused dX", dx_peft, dx_unf)
    bench.assert_close("recpeft dA vs unfused dA", da_peft, da_unf)
    bench.assert_close("recpeft dB vs unfused dB", db_peft, db_unf)
    delta = (y_peft - y_frozen).abs().max().item()
    assert delta > 0.1 * y_frozen.abs().max().item(), f"the adapter barely changes the output ({delta:.2e})"
    x.grad = None
    return variants


def test_variants_agree(case):
    """The check itself runs in the ``case`` fixture, before any timing."""
    assert set(case) == set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_lora_linear_fwd_bwd(benchmark, report, case, name):
    report.time(benchmark, name, case[name], rounds=ROUNDS)


def test_lora_linear_interleaved(request, bench, report, case):
    bench.skip_if_not_timing(request.config)
    report.time_interleaved(case, rounds=INTERLEAVED_ROUNDS)
