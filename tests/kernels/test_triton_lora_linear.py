"""The Triton LoRA linear (kernels/lora_linear.py) against autograd of the naive float64 formula:
forward, dX, dA, dB and db, both routes, folded and separate rank products, dropout, every
autotune config. On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py); the same
tests run compiled on a CUDA GPU when one is present.

Every launcher output is poisoned (NaN-filled, preallocated) before the run, so an element a
kernel forgets to write fails the check.
"""

import importlib
import math
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from recpeft.kernels.launch import INTERPRETING
from recpeft.kernels.reference import LinearRoute
from recpeft.layers import LoraLinear

from linear_cases import make_inputs, oracle

OP_MODULE = "recpeft.kernels.lora_linear"
ops = importlib.import_module(OP_MODULE)

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETING,
            reason="Triton runs CPU tensors only under TRITON_INTERPRET=1 (conftest sets it without CUDA)",
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="needs a CUDA GPU; CPU runs use the Triton interpreter"
        ),
    ),
]

# Checks are componentwise: |got − ref| ≤ TOLERANCE[dtype] · bound, where bound is the same
# formula (and its gradients) evaluated on absolute values — |x|·|W|ᵀ + |b| + |s|·|d(x)|·|A|ᵀ·|B|ᵀ
# for y, and likewise for dX, dA, dB, db. That is the classical error bound of a floating-point
# dot product, so the check is tight per element yet immune to cancellation. With float32
# accumulation, the error is at most a few roundings to the input dtype (unit roundoff u) along
# any path: the output store, s·u or s·v before their tl.dot, d(x) or W' = W + s·B·A — three at
# most — plus the float32 sums.
TOLERANCE = {
    # γ_n = n·2^-24 for the longest float32 sum here (n ≤ 48 + 128 + 40 terms: K or N, r, rows),
    # 1.3e-5; the interpreter and the GPU sum in float32 in different orders (atomics included).
    torch.float32: 2e-5,
    # u = 2^-11 = 4.9e-4; three roundings ≈ 1.5e-3, plus margin for the float32 sums.
    torch.float16: 2.5e-3,
    # u = 2^-8 = 3.9e-3; three roundings ≈ 1.2e-2, plus margin for the float32 sums.
    torch.bfloat16: 2e-2,
}
DTYPES = list(TOLERANCE)
SCALE = -1.3  # negative, so a kernel that drops the sign of s fails


# ---------------------------------------------------------------------------------------------
# Checking against the float64 oracle (tests/linear_cases.py)
# ---------------------------------------------------------------------------------------------


def assert_within(name, got, expected, bound, dtype):
    assert got is not None, f"{name}: missing"
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    err = (got.double().cpu() - expected).abs()
    limit = TOLERANCE[dtype] * bound
    bad = ~(err <= limit)  # NaN (an unwritten, poisoned element) counts as bad
    if bad.any():
        i = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{name} [{dtype}]: {int(bad.sum())} of {err.numel()} elements out of bound; "
            f"first at {i}: got {got[tuple(i)].item()}, expected {expected[tuple(i)].item()}, "
            f"bound {limit[tuple(i)].item():.3g}"
        )


def poisoned(shape, dtype, device):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def run_launchers(inp, route, fold_fwd, fold_bwd, p, seed, need_bias, configs=None):
    """Forward and backward through the launchers, into NaN-poisoned outputs."""
    x = inp["x"]
    m, k = x.shape
    n, r = inp["weight"].shape[0], inp["lora_A"].shape[0]
    dtype, device = x.dtype, x.device
    u_out = poisoned((m, r), torch.float32, device) if route is LinearRoute.EPILOGUE else None
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
        out=poisoned((m, n), dtype, device),
        u_out=u_out,
        configs=configs,
    )
    out = ops.LoraGrads(
        x=poisoned((m, k), dtype, device),
        lora_A=poisoned((r, k), dtype, device),
        lora_B=poisoned((n, r), dtype, device),
        bias=poisoned((n,), dtype, device) if need_bias else None,
    )
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
    return y, u, grads


def check_launchers(inp, route, fold_fwd, fold_bwd, p, seed, configs=None):
    need_bias = inp["bias"] is not None
    y, u, grads = run_launchers(inp, route, fold_fwd, fold_bwd, p, seed, need_bias, configs)
    m, k = inp["x"].shape
    keep = ops.dropout_keep_scale(seed, m, k, p, inp["x"].device).cpu() if p > 0 else None
    ref, bound = oracle(inp, SCALE, keep)
    dtype = inp["x"].dtype
    assert_within("y", y, ref["y"], bound["y"], dtype)
    if route is LinearRoute.EPILOGUE:
        assert_within("u", u, ref["u"], bound["u"], torch.float32 if dtype == torch.float32 else dtype)
    for name in ("x", "lora_A", "lora_B") + (("bias",) if need_bias else ()):
        assert_within(f"d{name}", getattr(grads, name), ref[name], bound[name], dtype)


# ---------------------------------------------------------------------------------------------
# Launchers: random shapes, every path
# ---------------------------------------------------------------------------------------------

# (route, fold the forward's u, fold the backward's v): every kernel path of the module.
PATHS = [
    (LinearRoute.MERGE, None, None),
    (LinearRoute.EPILOGUE, True, True),
    (LinearRoute.EPILOGUE, False, False),
    (LinearRoute.EPILOGUE, False, True),
    (LinearRoute.EPILOGUE, True, False),
]

cases = st.fixed_dictionaries(
    {
        "m": st.integers(0, 40),  # M=0 and M=1 come up too (and in the leading-shape test)
        "k": st.integers(1, 48),
        "n": st.integers(1, 48),
        "r": st.integers(1, 20),
        "bias": st.booleans(),
        "dtype": st.sampled_from(DTYPES),
        "dropout": st.booleans(),
        "seed": st.integers(0, 2**20),
    }
)


def _path_id(path):
    route, fold_fwd, fold_bwd = path
    return f"{route.value}-fold_fwd={fold_fwd}-fold_bwd={fold_bwd}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("path", PATHS, ids=_path_id)
@settings(max_examples=25)
@given(case=cases)
def test_launchers_match_float64(device, path, case):
    route, fold_fwd, fold_bwd = path
    # dropout where the path allows it: not on the merge route, not with the forward shrink folded
    p = 0.3 if case["dropout"] and route is LinearRoute.EPILOGUE and not fold_fwd else 0.0
    inp = make_inputs(case["m"], case["k"], case["n"], case["r"], case["dtype"], device, case["bias"], case["seed"])
    check_launchers(inp, route, fold_fwd, fold_bwd, p, seed=case["seed"] + 7)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("path", PATHS, ids=_path_id)
def test_rank_128(device, dtype, path):
    route, fold_fwd, fold_bwd = path
    inp = make_inputs(3, 5, 4, 128, dtype, device, seed=3)
    check_launchers(inp, route, fold_fwd, fold_bwd, 0.0, seed=0)


@pytest.mark.parametrize("device", DEVICES)
def test_rank_128_with_dropout(device):
    inp = make_inputs(3, 5, 4, 128, torch.float32, device, seed=4)
    check_launchers(inp, LinearRoute.EPILOGUE, False, True, 0.5, seed=11)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", list(ops.KERNEL_CONFIGS))
def test_every_gpu_config(device, kernel):
    """Each config the GPU autotuner can pick, forced, in a dtype whose launches tune over it
    (bf16: tensor-core tiles; fp32 at full precision: FMA tiles), on a shape with ragged edges
    (and, under the interpreter, bigger tiles than the tests' usual 16)."""
    paths = {
        "forward": [(LinearRoute.EPILOGUE, True, True)],
        "grad_x": [(LinearRoute.EPILOGUE, True, True), (LinearRoute.EPILOGUE, False, False)],
        "skinny_products": [(LinearRoute.MERGE, None, None)],
    }[kernel]
    families = [(c, torch.bfloat16) for c in ops.TENSOR_CORE_CONFIGS[kernel]]
    families += [(c, torch.float32) for c in ops.FMA_CONFIGS[kernel]]  # full-precision fp32: FMA tiles
    for i, (config, dtype) in enumerate(families):
        inp = make_inputs(70, 37, 45, 6, dtype, device, seed=i)
        for route, fold_fwd, fold_bwd in paths:
            check_launchers(inp, route, fold_fwd, fold_bwd, 0.0, 0, configs={kernel: config})
        if kernel != "forward":  # the dropout paths of the backward kernels
            check_launchers(inp, LinearRoute.EPILOGUE, False, kernel == "grad_x", 0.2, 5, configs={kernel: config})


# ---------------------------------------------------------------------------------------------
# Dropout: one mask, made from a seed, identical in forward and backward
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_values_and_rate(device, p):
    m, k = 64, 96
    mask = ops.dropout_keep_scale(12345, m, k, p, device).cpu()
    kept = mask != 0
    assert torch.equal(mask[kept], torch.full_like(mask[kept], 1.0 / (1.0 - p), dtype=torch.float32))
    sigma = math.sqrt(p * (1 - p) / mask.numel())
    assert abs((~kept).float().mean().item() - p) < 5 * sigma
    assert torch.equal(mask, ops.dropout_keep_scale(12345, m, k, p, device).cpu())  # a function of the seed
    assert not torch.equal(mask, ops.dropout_keep_scale(54321, m, k, p, device).cpu())
    # rows and columns get independent draws: no row or column is a copy of its neighbour
    assert not torch.equal(mask[0], mask[1]) and not torch.equal(mask[:, 0], mask[:, 1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fold_bwd", [True, False])
def test_dropout_seed_from_torch_generator_same_mask_in_backward(device, fold_bwd):
    """The op draws its seed from torch's generator; forward, dX and dA all use the mask
    regenerated from that seed — a backward that drew its own would fail dX and dA."""
    inp = make_inputs(13, 21, 17, 4, torch.float32, device, seed=9)
    x, A, B = (t.clone().requires_grad_(True) for t in (inp["x"], inp["lora_A"], inp["lora_B"]))
    torch.manual_seed(77)
    y = ops.lora_linear(x, inp["weight"], inp["bias"], A, B, SCALE, 0.4, route=LinearRoute.EPILOGUE, fold=fold_bwd)
    y.backward(inp["grad_y"])
    torch.manual_seed(77)
    keep = ops.dropout_keep_scale(ops.draw_dropout_seed(), 13, 21, 0.4, device).cpu()
    ref, bound = oracle(inp, SCALE, keep)
    assert_within("y", y, ref["y"], bound["y"], torch.float32)
    for name, leaf in (("x", x), ("lora_A", A), ("lora_B", B)):
        assert_within(f"d{name}", leaf.grad, ref[name], bound[name], torch.float32)
    torch.manual_seed(78)
    other = ops.lora_linear(x, inp["weight"], inp["bias"], A, B, SCALE, 0.4, route=LinearRoute.EPILOGUE)
    assert not torch.equal(other, y), "a new seed must give a new mask"


def test_dropout_refuses_the_merge_route_and_a_folded_shrink():
    inp = make_inputs(4, 5, 6, 2, torch.float32, "cpu")
    args = (inp["x"], inp["weight"], inp["bias"], inp["lora_A"], inp["lora_B"], 1.0, 0.2, 1)
    with pytest.raises(ValueError, match="merge route"):
        ops.lora_linear_forward(*args, route=LinearRoute.MERGE)
    with pytest.raises(ValueError, match="fold=True"):
        ops.lora_linear_forward(*args, route=LinearRoute.EPILOGUE, fold=True)


# ---------------------------------------------------------------------------------------------
# The public op: leading shapes, non-contiguous input, autograd
# ---------------------------------------------------------------------------------------------

op_cases = st.fixed_dictionaries(
    {
        "lead": st.sampled_from([(0,), (1,), (9,), (3, 5), (2, 1, 4)]),
        "k": st.integers(1, 40),
        "n": st.integers(1, 40),
        "r": st.integers(1, 12),
        "dtype": st.sampled_from(DTYPES),
        "route": st.sampled_from([None, LinearRoute.MERGE, LinearRoute.EPILOGUE]),
        "transposed": st.booleans(),
        "seed": st.integers(0, 2**20),
    }
)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=20)
@given(case=op_cases)
def test_op_any_leading_shape_and_layout(device, case):
    lead, k, dtype = case["lead"], case["k"], case["dtype"]
    m = math.prod(lead)
    inp = make_inputs(m, k, case["n"], case["r"], dtype, device, seed=case["seed"])
    x = inp["x"].reshape(*lead, k)
    if case["transposed"]:  # same values stored column-major: a view with non-unit column stride
        x = inp["x"].t().contiguous().t().view(*lead, k)
    leaves = {name: inp[name].clone().requires_grad_(True) for name in ("weight", "bias", "lora_A", "lora_B")}
    x = x.detach().requires_grad_(True)
    y = ops.lora_linear(
        x, leaves["weight"], leaves["bias"], leaves["lora_A"], leaves["lora_B"], SCALE, route=case["route"]
    )
    assert y.shape == (*lead, case["n"])
    y.backward(inp["grad_y"].reshape(*lead, case["n"]))
    ref, bound = oracle(inp, SCALE, None)
    assert_within("y", y.reshape(m, case["n"]), ref["y"], bound["y"], dtype)
    assert_within("dx", x.grad.reshape(m, k), ref["x"], bound["x"], dtype)
    for name in ("lora_A", "lora_B", "bias"):
        assert_within(f"d{name}", leaves[name].grad, ref[name], bound[name], dtype)
    # W trained too (dense fine-tuning through the op): dW = dYᵀ·x
    expected_w = inp["grad_y"].double().cpu().t() @ inp["x"].double().cpu()
    bound_w = inp["grad_y"].double().cpu().abs().t() @ inp["x"].double().cpu().abs()
    assert_within("dW", leaves["weight"].grad, expected_w, bound_w, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_rows_are_read_in_place(device):
    """A row-strided view (every other row of a wider buffer) is read through its strides."""
    inp = make_inputs(10, 12, 7, 3, torch.float32, device, seed=2)
    wide = torch.zeros(20, 30, device=device)
    view = wide[::2, 5:17]
    view.copy_(inp["x"])
    assert not view.is_contiguous()
    inp["x"] = view
    check_launchers(inp, LinearRoute.EPILOGUE, True, True, 0.0, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_only_adapter_gradients(device):
    """x and the bias frozen (the first layer of a model): dA and dB without a dX GEMM."""
    inp = make_inputs(11, 9, 8, 3, torch.float32, device, seed=5)
    A, B = inp["lora_A"].clone().requires_grad_(True), inp["lora_B"].clone().requires_grad_(True)
    y = ops.lora_linear(inp["x"], inp["weight"], inp["bias"], A, B, SCALE, route=LinearRoute.EPILOGUE, fold=True)
    y.backward(inp["grad_y"])
    ref, bound = oracle(inp, SCALE, None)
    assert_within("dA", A.grad, ref["lora_A"], bound["lora_A"], torch.float32)
    assert_within("dB", B.grad, ref["lora_B"], bound["lora_B"], torch.float32)


def test_shape_and_dtype_errors_are_named():
    inp = make_inputs(4, 5, 6, 2, torch.float32, "cpu")
    with pytest.raises(ValueError, match="lora_B has shape"):
        ops.lora_linear_forward(inp["x"], inp["weight"], None, inp["lora_A"], inp["lora_B"].t(), 1.0)
    with pytest.raises(TypeError, match="lora_A is torch.float64"):
        ops.lora_linear_forward(inp["x"], inp["weight"], None, inp["lora_A"].double(), inp["lora_B"], 1.0)


def test_route_and_fold_follow_the_cost_model():
    bf16 = 2
    # dropout needs the epilogue; a handful of rows never pays for forming W' = W + s·B·A
    assert ops.choose_route(65536, 512, 512, 16, bf16, dropout_active=True) is LinearRoute.EPILOGUE
    assert ops.choose_route(4, 4096, 4096, 16, bf16, dropout_active=False) is LinearRoute.EPILOGUE
    # a big compute-bound GEMM: the library GEMM on W' beats Triton's GEMM
    assert ops.choose_route(8192, 4096, 4096, 16, bf16, dropout_active=False) is LinearRoute.MERGE
    # folding u = x·Aᵀ into a GEMM with 4 column tiles at r=16 is cheap; with 32 tiles or r=128 it is not
    assert ops.fold_rank_product(65536, 512, 512, 16, bf16)
    assert not ops.fold_rank_product(8192, 4096, 4096, 16, bf16)
    assert not ops.fold_rank_product(65536, 512, 512, 128, bf16)
    costs = ops.route_extra_seconds(65536, 1024, 1024, 64, bf16)
    assert set(costs) == set(LinearRoute) and all(c > 0 for c in costs.values())


# ---------------------------------------------------------------------------------------------
# LoraLinear through the dispatch point
# ---------------------------------------------------------------------------------------------


def _layer(device, k=20, n=11, r=4, bias=True):
    layer = LoraLinear(nn.Linear(k, n, bias=bias).to(device), "fc")
    layer.update_layer("default", r=r, scale=2.0, dropout=0.0, init=False)  # B random: the adapter counts
    layer.active_adapters = ["default"]
    return layer


def _forward_backward(layer, x):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, layer.lora_A["default"].grad, layer.lora_B["default"].grad


@pytest.mark.parametrize("device", DEVICES)
def test_layer_uses_the_triton_op_when_forced(monkeypatch, device):
    calls = []
    real_op = ops.lora_linear

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real_op(*args, **kwargs)

    monkeypatch.setattr(ops, "lora_linear", spy)
    layer = _layer(device)
    x = torch.randn(2, 7, 20, device=device)
    monkeypatch.setenv("RECPEFT_BACKEND", "torch")
    expected = _forward_backward(layer, x)
    assert not calls
    monkeypatch.setenv("RECPEFT_BACKEND", "triton")
    flat = {"x": x.reshape(-1, 20), "weight": layer.base_layer.weight, "bias": layer.base_layer.bias}
    flat |= {"lora_A": layer.lora_A["default"], "lora_B": layer.lora_B["default"], "grad_y": torch.ones(14, 11)}
    ref, bound = oracle({k: v.detach().cpu() for k, v in flat.items()}, 2.0, None)
    for _ in range(2):  # twice: the op must stay reachable after its lazy import
        got = _forward_backward(layer, x)
        for name, ours, theirs in zip(("y", "x", "lora_A", "lora_B"), got, expected):  # each against float64
            shape = ref[name].shape
            assert_within(f"triton {name}", ours.reshape(shape), ref[name], bound[name], torch.float32)
            assert_within(f"torch {name}", theirs.reshape(shape), ref[name], bound[name], torch.float32)
    assert calls == [x.shape, x.shape]


@pytest.mark.parametrize("device", DEVICES)
def test_layer_keeps_working_after_the_lazy_import(monkeypatch, device):
    """The first Triton call imports recpeft.kernels.lora_linear lazily; the second forward must
    still reach the op."""
    monkeypatch.delitem(sys.modules, OP_MODULE)
    monkeypatch.setenv("RECPEFT_BACKEND", "triton")
    layer = _layer(device)
    x = torch.randn(5, 20, device=device)
    first = layer(x)
    second = layer(x)
    flat = {"x": x, "weight": layer.base_layer.weight, "bias": layer.base_layer.bias}
    flat |= {"lora_A": layer.lora_A["default"], "lora_B": layer.lora_B["default"], "grad_y": torch.ones(5, 11)}
    ref, bound = oracle({k: v.detach().cpu() for k, v in flat.items()}, 2.0, None)
    # against float64, not each other: on a GPU the autotuner may pick another config (another order)
    assert_within("first", first, ref["y"], bound["y"], torch.float32)
    assert_within("second", second, ref["y"], bound["y"], torch.float32)
