"""The autotuned launchers of kernels/lora_linear.py with the autotuner's benchmarking switched ON
under the interpreter: several configs per kernel and a stand-in ``do_bench`` that runs the
kernel several times, as triton's does, before a pick.

With one config (what the interpreter otherwise gets) the autotuner never benchmarks, so its
hooks — ``reset_to_zero`` zeroing buffers between timing runs, or timing runs adding into an
accumulator — are never exercised. Here the first call of each shape benchmarks, and every
output and gradient of that very call is checked against autograd of the unfused float64
formula. (With the accumulators under ``reset_to_zero``, as before, dA and dB came back zero on
the separate-products route: the skinny-products kernel fills them, then the dX GEMM's autotuner
zeroed them.) The float64 routing of the public op is checked here too.
"""

import pytest
import torch
import triton

from recpeft.kernels import lora_linear as ops
from recpeft.kernels import reference
from recpeft.kernels.launch import INTERPRETING
from recpeft.kernels.reference import LinearRoute

from linear_cases import make_inputs, oracle
from reference_math import assert_bound_can_fail, assert_within_bound

pytestmark = pytest.mark.skipif(
    not INTERPRETING, reason="the interpreter stands in for the GPU here (conftest sets TRITON_INTERPRET=1 on CPU)"
)

M, K, N, R = 40, 37, 45, 6  # ragged against every tile below
SCALE = -1.3
TIMING_RUNS = 3  # kernel runs per config in the stand-in do_bench (triton's does dozens)


def _gemm(block_m, block_n, block_k):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 2}, num_warps=4)


def _skinny(block_m, block_c):
    return triton.Config({"BLOCK_M": block_m, "BLOCK_C": block_c}, num_warps=4)


# Two or three configs per autotuned kernel: tiles of 16 and 32, so the pick is a real choice.
SEVERAL_CONFIGS = {
    "forward": [_gemm(16, 16, 16), _gemm(32, 16, 16), _gemm(16, 32, 32)],
    "grad_x": [_gemm(16, 16, 16), _gemm(32, 32, 16)],
    "skinny_products": [_skinny(16, 16), _skinny(32, 32)],
}


class StandInBench:
    """do_bench for the autotuner: runs ``kernel_call`` TIMING_RUNS times, as triton's timer
    runs it repeatedly, and reports times that fall with each config timed, so the last one
    benchmarked wins (not the first one, which a non-benchmarking autotuner would take)."""

    def __init__(self):
        self.calls = 0

    def __call__(self, kernel_call, quantiles):
        for _ in range(TIMING_RUNS):
            kernel_call()
        self.calls += 1
        t = 1.0 / self.calls
        return [t, t, t]


@pytest.fixture
def bench(monkeypatch):
    """Fresh autotuners (empty caches: the first call of each shape benchmarks) over
    SEVERAL_CONFIGS, timed by a StandInBench."""
    timer = StandInBench()
    monkeypatch.setattr(ops, "_TUNED", ops.tuned_kernels(SEVERAL_CONFIGS, do_bench=timer))
    return timer


def _inputs(seed, bias=True):
    return make_inputs(M, K, N, R, torch.float32, "cpu", bias=bias, seed=seed)


# Roundings on the longest float32 chain, counted generously: dX = dY·W (N terms) + s·(v·A) with
# v = dY·B (N) cast and scaled (2), then r terms; dA = s·vᵀ·d(x): v (N), s (1), the mask (1), M
# rows (atomics in any order); dB = s·dYᵀ·u: u (K), s, M rows; the final stores and casts (2).
ROUNDINGS = M + N + K + R + 8


def _check(name, got, expected, bound):
    assert_within_bound(got, expected, bound, ROUNDINGS, torch.float32, computed=1, name=name)


# (route, fold forward, fold backward, dropout p): every path, so every autotuned kernel runs
# benchmarked — forward, grad_x with v folded and loaded, skinny products in all three roles.
PATHS = [
    (LinearRoute.MERGE, None, None, 0.0),
    (LinearRoute.EPILOGUE, True, True, 0.0),
    (LinearRoute.EPILOGUE, False, False, 0.0),
    (LinearRoute.EPILOGUE, True, False, 0.0),
    (LinearRoute.EPILOGUE, False, True, 0.3),
    (LinearRoute.EPILOGUE, False, False, 0.3),
]


@pytest.mark.parametrize("path", PATHS, ids=lambda p: f"{p[0].value}-fold={p[1]}/{p[2]}-p={p[3]}")
@pytest.mark.parametrize("bias", [True, False])
def test_first_benchmarked_call_matches_float64(bench, path, bias):
    route, fold_fwd, fold_bwd, p = path
    inp = _inputs(seed=len(path) + int(bias), bias=bias)
    seed = 11
    y, u = ops.lora_linear_forward(
        inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], SCALE, p, seed, route, fold_fwd
    )
    grads = ops.lora_linear_backward(
        inp["grad_y"],
        inp["x"],
        u,
        inp["weight"],
        inp["lora_A"],
        inp["lora_B"],
        SCALE,
        p,
        seed,
        route,
        fold_bwd,
        need_bias=bias,
    )
    assert bench.calls >= 2, "the autotuner did not benchmark: the test would not test it"
    keep = ops.dropout_keep_scale(seed, M, K, p, "cpu").double() if p > 0 else None
    expected, bound = oracle(inp, SCALE, keep)
    _check("y", y, expected["y"], bound["y"])
    for name in ("x", "lora_A", "lora_B") + (("bias",) if bias else ()):
        assert_bound_can_fail(expected[name], bound[name], ROUNDINGS, torch.float32, computed=1, name=name)
        _check(f"d{name}", getattr(grads, name), expected[name], bound[name])


def test_second_call_uses_the_cached_pick_and_agrees(bench):
    """After the benchmarked first call, the same shape reuses the pick without timing, and gives
    the very same results (the interpreter adds in a fixed order): nothing of the timing runs
    leaked into the first call's outputs."""
    inp = _inputs(seed=3)
    frozen = (inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], SCALE)
    results, calls = [], []
    for _ in range(2):
        y, u = ops.lora_linear_forward(inp["x"], *frozen, route=LinearRoute.EPILOGUE, fold=False)
        grads = ops.lora_linear_backward(
            inp["grad_y"], inp["x"], u, inp["weight"], inp["lora_A"], inp["lora_B"], SCALE, fold=False
        )
        results.append((y, grads.x, grads.lora_A, grads.lora_B))
        calls.append(bench.calls)
    assert calls[0] >= 2 and calls[1] == calls[0], f"timed calls after each run: {calls}"
    for name, first, second in zip(("y", "dx", "dA", "dB"), *results):
        assert torch.equal(first, second), name


def test_every_autotuned_kernel_is_built_by_tuned_kernels():
    """Each autotuner of the op comes from tuned_kernels (so the fixture above replaces all of
    them), and none zeroes a buffer between timing runs."""
    assert set(ops._TUNED) == set(ops._KERNELS) == set(SEVERAL_CONFIGS)
    for name, tuner in ops._TUNED.items():
        assert not tuner.reset_to_zero, f"{name}: reset_to_zero would zero results made before the kernel"
        assert set(tuner.restore_value) == (set(ops._ACCUMULATORS) if ops._WRITES_ACCUMULATORS[name] else set())


def test_float64_runs_the_reference_op(monkeypatch):
    """float64 never reaches Triton, where it would not compile (a float64 accumulator changes
    the loop-carried type); the result is the reference op's, gradients included."""

    def refuse(*args, **kwargs):
        raise AssertionError("float64 reached the Triton launchers")

    monkeypatch.setattr(ops, "lora_linear_forward", refuse)
    inp = {k: v.double() for k, v in _inputs(seed=5).items()}
    results = []
    for op in (ops.lora_linear, reference.lora_linear):
        leaves = {k: inp[k].clone().requires_grad_(True) for k in ("x", "lora_A", "lora_B")}
        y = op(leaves["x"], inp["weight"], inp["bias"], leaves["lora_A"], leaves["lora_B"], SCALE, 0.0)
        y.backward(inp["grad_y"])
        results.append((y.detach(), *(t.grad for t in leaves.values())))
    assert results[0][0].dtype == torch.float64
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
