"""GPU section: the fused LoRA linear (kernels/lora_linear.py).

First checks every path of the op — merge route; epilogue route with u and v folded into the
GEMMs or made by the skinny-products kernel; dropout — against the float64 formula on CUDA, with every
config the autotuner can pick forced in turn, at each timed shape's K, N, r (so the autotuner's
later compiles are the checked ones) and at one ragged shape; raises on any mismatch, so nothing
is timed then. Then times, side by side, bf16, dropout 0, M×K → N at rank r:

    base          frozen nn.Linear: forward, and forward + backward with the input gradient (the floor)
    unfused       base(x) + B(A(x))·s in eager PyTorch (what HF PEFT runs), dX, dA, dB
    merge         the fused op, merge route (library GEMM on W + s·B·A; Triton skinny products)
    epilogue      the fused op, epilogue route, with u/v folded into the Triton GEMMs and without
    dense         dense fine-tuning of the layer: dX, dW, db

Each row's ``x_base`` is its time over the base's (forward rows over the base forward), and
``x_floor`` its time over its roofline floor, max(FLOPs / bf16 rate, bytes / copy bandwidth)
with the rate and bandwidth measured by the suite. The fewest bytes each op must move:
    base fwd       x, W, y                       base fwd+bwd  + dY, W, dX
    LoRA fwd+bwd   base fwd+bwd + x again (dA = s·vᵀ·x needs it in backward)
    dense fwd+bwd  base fwd+bwd + dY, x, dW
(A, B, u, v are r/K of these and left out.) FLOPs: 2·M·K·N per GEMM, plus 2·M·r·(K + N) per
rank-r product pair for LoRA (forward u and s·u·Bᵀ; backward v, s·v·A, dA, dB). The rows the
op's cost model would run are starred (``model_pick``); each route is timed either way.

Targets (H200): fused fwd+bwd ≤ 1.10x base at 65536×512→512 r16 and ≤ 1.05x at
8192×4096→4096 r16; ≥ 1.8x faster than unfused at 65536×512→512 r16; fused forward ≤ 1.05x the
base forward. "fused" is the route the op's cost model picks; every route is timed beside it.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from recpeft.kernels import dispatch
from recpeft.kernels.reference import LinearRoute

from .common import bench_ms, check_close, print_table

SHAPES = [(65536, 512, 512, 16), (65536, 1024, 1024, 64), (8192, 4096, 4096, 16)]  # M, K, N, r
QUICK_M_DIVISOR = 16
CHECK_ROWS = 4096  # rows of the per-shape checks: a multiple of 16 like every timed M, so the
# checked kernels specialise exactly as the timed ones do and the autotuner reuses them
RAGGED_SHAPE = (1000, 300, 200, 12)  # edges in every tile, r padded to 16
SCALE = 2.0
DROPOUT_P = 0.1
DTYPE = torch.bfloat16
ELT = 2  # bytes per bf16

# Checks are componentwise against the float64 formula: |got − ref| ≤ CHECK_TOL · bound, the
# bound being the formula on absolute values (the float dot-product error bound). bf16's unit
# roundoff is 2^-8 = 3.9e-3 and a value passes through at most three roundings (s·u or s·v
# before their dot, d(x) or W' = W + s·B·A, the output store); float32 sums of ≤ 4096 terms add
# ≤ 2.5e-4. A wrong index, mask or tile errs by O(1) of the bound.
CHECK_TOL = 2e-2

TARGET_FWD_BWD = {(65536, 512, 512, 16): 1.10, (8192, 4096, 4096, 16): 1.05}
TARGET_SPEEDUP_VS_UNFUSED = {(65536, 512, 512, 16): 1.8}
TARGET_FWD = 1.05


def _op_module():
    """The Triton module of the op, found the way dispatch finds it (ImportError naming the module
    when it does not import)."""
    return sys.modules[dispatch.triton_op("lora_linear").__module__]


# ---------------------------------------------------------------------------------------------
# Check
# ---------------------------------------------------------------------------------------------


def _inputs(m, k, n, r, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    return {
        "x": rnd(m, k),
        "weight": rnd(n, k),
        "bias": rnd(n),
        "lora_A": rnd(r, k),
        "lora_B": rnd(n, r),
        "grad_y": rnd(m, n),
    }


def _oracle(inp, scale, keep):
    """Float64 y, dX, dA, dB, db of y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ, and the same formula on
    absolute values (the error bound)."""

    def run(absolute):
        f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())  # noqa: E731
        x, W, b, A, B, dy = (f(inp[k]) for k in ("x", "weight", "bias", "lora_A", "lora_B", "grad_y"))
        s = abs(scale) if absolute else scale
        x_drop = x if keep is None else x * keep.double()
        u = x_drop @ A.t()
        v = dy @ B
        dx_lora = s * (v @ A)
        return {
            "y": x @ W.t() + b + s * (u @ B.t()),
            "x": dy @ W + (dx_lora if keep is None else dx_lora * keep.double()),
            "lora_A": s * (v.t() @ x_drop),
            "lora_B": s * (dy.t() @ u),
            "bias": dy.sum(0),
        }

    return run(False), run(True)


def _check_case(ops, inp, route, fold_fwd, fold_bwd, p, seed, configs, label, need_bias):
    """One forward + backward through the launchers into NaN-poisoned outputs, against _oracle."""
    x = inp["x"]
    m, k = x.shape
    n, r = inp["weight"].shape[0], inp["lora_A"].shape[0]
    nan = lambda *shape: torch.full(shape, float("nan"), dtype=x.dtype, device=x.device)  # noqa: E731
    y, u = ops.lora_linear_forward(
        x,
        inp["weight"],
        inp["bias"],
        inp["lora_A"],
        inp["lora_B"],
        SCALE,
        p,
        seed,
        route,
        fold_fwd,
        out=nan(m, n),
        configs=configs,
    )
    out = ops.LoraGrads(x=nan(m, k), lora_A=nan(r, k), lora_B=nan(n, r), bias=nan(n) if need_bias else None)
    grads = ops.lora_linear_backward(
        inp["grad_y"],
        x,
        u,
        inp["weight"],
        inp["lora_A"],
        inp["lora_B"],
        SCALE,
        p,
        seed,
        route,
        fold_bwd,
        need_x=True,
        need_bias=need_bias,
        out=out,
        configs=configs,
    )
    keep = ops.dropout_keep_scale(seed, m, k, p, x.device) if p > 0 else None
    ref, bound = _oracle(inp, SCALE, keep)
    got = {"y": y, "x": grads.x, "lora_A": grads.lora_A, "lora_B": grads.lora_B}
    if need_bias:
        got["bias"] = grads.bias
    for name, value in got.items():
        relative = (value.double() - ref[name]) / bound[name].clamp_min(1e-30)  # NaN stays NaN
        check_close(f"{label} {name}", relative, torch.zeros_like(relative), rtol=0.0, atol=CHECK_TOL)


def _paths(p):
    """(route, fold forward, fold backward) of every kernel path for dropout ``p``."""
    if p > 0:
        return [(LinearRoute.EPILOGUE, False, True), (LinearRoute.EPILOGUE, False, False)]
    return [(LinearRoute.MERGE, None, None), (LinearRoute.EPILOGUE, True, True), (LinearRoute.EPILOGUE, False, False)]


def check(ops, shapes, device="cuda", ragged=RAGGED_SHAPE, dtype=DTYPE) -> int:
    """Every path × every config of ``dtype``'s family (config i of each kernel together, i over
    the longest list; :func:`~recpeft.kernels.lora_linear.tuning_space`) at
    each (CHECK_ROWS, K, N, r) of ``shapes`` with a frozen bias, as timed (the same kernel
    specialisations, so the autotuner reuses these compiles); then every path, with and without
    dropout, at ``ragged`` with a trained bias (db). Returns the number of cases; raises
    AssertionError on the first mismatch."""
    spaces = {name: ops.tuning_space(name, {"DOT_PRECISION": ops._dot_precision(dtype)}) for name in ops.KERNEL_CONFIGS}
    longest = max(len(c) for c in spaces.values())
    picks = [{name: cfgs[i % len(cfgs)] for name, cfgs in spaces.items()} for i in range(longest)]
    cases = 0
    for m, k, n, r in shapes:
        inp = _inputs(min(m, CHECK_ROWS), k, n, r, dtype, device, seed=k + r)
        for route, fold_fwd, fold_bwd in _paths(0.0):
            for i, configs in enumerate(picks):
                label = f"{m}x{k}->{n} r{r} {route.value} fold={fold_fwd}/{fold_bwd} config#{i}"
                _check_case(ops, inp, route, fold_fwd, fold_bwd, 0.0, 0, configs, label, need_bias=False)
                cases += 1
    inp = _inputs(*ragged, dtype, device, seed=1)
    for p in (0.0, DROPOUT_P):
        for route, fold_fwd, fold_bwd in _paths(p):
            label = f"ragged {ragged} p={p} {route.value} fold={fold_fwd}/{fold_bwd}"
            _check_case(ops, inp, route, fold_fwd, fold_bwd, p, 1234, picks[0], label, need_bias=True)
            cases += 1
    return cases


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _floors_ms(env, m, k, n, r) -> dict:
    """Roofline floor of each op kind, ms (see the module docstring)."""
    gemm, io = 2.0 * m * k * n, m * k + k * n + m * n
    lora_flops = 2.0 * m * r * (k + n)
    kinds = {
        "fwd": (gemm, io),
        "lora_fwd": (gemm + lora_flops, io),
        "fwd_bwd": (2 * gemm, 2 * io),
        "lora_fwd_bwd": (2 * gemm + 3 * lora_flops, 2 * io + m * k),
        "dense_fwd_bwd": (3 * gemm, 3 * io),
    }
    rate, bandwidth = env["bf16_tflops"] * 1e12, env["copy_gbps"] * 1e9
    return {kind: 1e3 * max(flops / rate, nbytes * ELT / bandwidth) for kind, (flops, nbytes) in kinds.items()}


def _timed_ops(ops, inp):
    """name → (floor kind, callable) for one shape."""
    x, W, b, A, B, dy = (inp[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "grad_y"))
    xg, Ag, Bg = (t.detach().requires_grad_(True) for t in (x, A, B))
    Wd, bd = W.detach().requires_grad_(True), b.detach().requires_grad_(True)

    def fused(route, fold, grad=True):
        if not grad:
            return lambda: _no_grad(lambda: ops.lora_linear(x, W, b, A, B, SCALE, 0.0, route=route, fold=fold))
        return lambda: torch.autograd.grad(
            ops.lora_linear(xg, W, b, Ag, Bg, SCALE, 0.0, route=route, fold=fold), (xg, Ag, Bg), dy
        )

    def unfused(lx, la, lb):
        return F.linear(lx, W, b) + F.linear(F.linear(lx, la), lb) * SCALE

    return {
        "base_fwd": ("fwd", lambda: _no_grad(lambda: F.linear(x, W, b))),
        "unfused_fwd": ("lora_fwd", lambda: _no_grad(lambda: unfused(x, A, B))),
        "merge_fwd": ("lora_fwd", fused(LinearRoute.MERGE, None, grad=False)),
        "epilogue_fold_fwd": ("lora_fwd", fused(LinearRoute.EPILOGUE, True, grad=False)),
        "epilogue_split_fwd": ("lora_fwd", fused(LinearRoute.EPILOGUE, False, grad=False)),
        "base": ("fwd_bwd", lambda: torch.autograd.grad(F.linear(xg, W, b), (xg,), dy)),
        "unfused": ("lora_fwd_bwd", lambda: torch.autograd.grad(unfused(xg, Ag, Bg), (xg, Ag, Bg), dy)),
        "merge": ("lora_fwd_bwd", fused(LinearRoute.MERGE, None)),
        "epilogue_fold": ("lora_fwd_bwd", fused(LinearRoute.EPILOGUE, True)),
        "epilogue_split": ("lora_fwd_bwd", fused(LinearRoute.EPILOGUE, False)),
        "dense": ("dense_fwd_bwd", lambda: torch.autograd.grad(F.linear(xg, Wd, bd), (xg, Wd, bd), dy)),
    }


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def _model_pick(ops, m, k, n, r) -> dict:
    route = ops.choose_route(m, k, n, r, ELT, dropout_active=False)
    return {
        "route": route.value,
        "fold_fwd": ops.fold_rank_product(m, k, n, r, ELT),
        "fold_bwd": ops.fold_rank_product(m, n, k, r, ELT),
        "modelled_extra_us": {rt.value: 1e6 * s for rt, s in ops.route_extra_seconds(m, k, n, r, ELT).items()},
    }


def _fused_name(pick: dict, forward: bool) -> str:
    """The timed row that matches the cost model's pick (fold is per direction; the timed
    epilogue rows fold both or neither, so the backward's choice names the fwd+bwd row)."""
    if pick["route"] == LinearRoute.MERGE.value:
        return "merge_fwd" if forward else "merge"
    fold = pick["fold_fwd"] if forward else pick["fold_bwd"]
    return f"epilogue_{'fold' if fold else 'split'}{'_fwd' if forward else ''}"


def time_shape(ops, env, m, k, n, r) -> dict:
    inp = _inputs(m, k, n, r, DTYPE, "cuda", seed=7)
    floors = _floors_ms(env, m, k, n, r)
    timed = _timed_ops(ops, inp)
    ms = {name: bench_ms(fn) for name, (_, fn) in timed.items()}
    kinds = {name: kind for name, (kind, _) in timed.items()}
    pick = _model_pick(ops, m, k, n, r)
    picked = {_fused_name(pick, forward=False), _fused_name(pick, forward=True)}
    rows = []
    for name, t in ms.items():
        base = ms["base_fwd"] if name.endswith("_fwd") else ms["base"]
        rows.append(
            {
                "shape": f"{m}x{k}->{n} r{r}",
                "op": name,
                "ms": t,
                "x_base": t / base,
                "x_floor": t / floors[kinds[name]],
                "floor_ms": floors[kinds[name]],
                "model_pick": "*" if name in picked else "",
            }
        )
    fastest = min(("merge", "epilogue_fold", "epilogue_split"), key=ms.get)
    return {
        "ms": ms,
        "floors_ms": floors,
        "rows": rows,
        "model_pick": pick,
        "fastest_measured": fastest,
        "fused": _fused_name(pick, forward=False),
        "fused_fwd": _fused_name(pick, forward=True),
    }


def _targets(results: dict, quick: bool) -> list[dict]:
    targets = []
    for shape, res in results.items():
        ms = res["ms"]
        fused, fused_fwd = ms[res["fused"]], ms[res["fused_fwd"]]
        if not quick and shape in TARGET_FWD_BWD:
            targets.append(_target(f"{shape} fused fwd+bwd / base", fused / ms["base"], "<=", TARGET_FWD_BWD[shape]))
        if not quick and shape in TARGET_SPEEDUP_VS_UNFUSED:
            targets.append(
                _target(f"{shape} unfused / fused", ms["unfused"] / fused, ">=", TARGET_SPEEDUP_VS_UNFUSED[shape])
            )
        targets.append(_target(f"{shape} fused fwd / base fwd", fused_fwd / ms["base_fwd"], "<=", TARGET_FWD))
    return targets


def _target(name, value, op, limit) -> dict:
    met = value <= limit if op == "<=" else value >= limit
    return {"target": name, "value": value, "limit": f"{op} {limit}", "met": met}


def run(env: dict, quick: bool) -> dict:
    ops = _op_module()
    shapes = [(m // QUICK_M_DIVISOR if quick else m, k, n, r) for m, k, n, r in SHAPES]
    checked = check(ops, shapes)
    print(f"\nlinear: {checked} checks against float64 passed (every path, every config)")
    results = {}
    for (m, k, n, r), full in zip(shapes, SHAPES):
        results[full] = time_shape(ops, env, m, k, n, r)
        torch.cuda.empty_cache()
    rows = [row for res in results.values() for row in res["rows"]]
    print_table(
        "LoRA linear, bf16, dropout 0 (ms; x_base vs frozen layer; x_floor vs roofline)",
        rows,
        ["shape", "op", "ms", "x_base", "x_floor", "floor_ms", "model_pick"],
    )
    targets = _targets(results, quick)
    print_table("LoRA linear targets", targets, ["target", "value", "limit", "met"])
    for shape, res in results.items():
        print(
            f"{shape}: cost model picks {res['model_pick']['route']} "
            f"(fold fwd {res['model_pick']['fold_fwd']}, bwd {res['model_pick']['fold_bwd']}); "
            f"fastest measured {res['fastest_measured']}"
        )
    return {
        "checks": checked,
        "dtype": str(DTYPE),
        "scale": SCALE,
        "shapes": {f"{m}x{k}->{n} r{r}": res for (m, k, n, r), res in results.items()},
        "targets": targets,
    }
