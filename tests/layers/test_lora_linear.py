"""LoRA linear: forward and every gradient against autograd of the naive float64 formula, both
routes, with and without dropout, any leading shape."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from recpeft.kernels import reference
from recpeft.kernels.reference import LinearRoute
from recpeft.layers import LoraLinear

from reference_math import abs_twin, assert_bound_can_fail, assert_within_bound, leaf64, naive_lora_linear


def _abs_oracle(x, W, b, A, B, scale, mask=None, dy=None):
    """The naive formula and its gradients on absolute values (the bound of
    reference_math.assert_within_bound); dy None: the loss Σ y²."""
    leaves = [leaf64(t.abs()) if t is not None else None for t in (x, W, b, A, B)]
    y = naive_lora_linear(*leaves, abs(scale), None if mask is None else mask.abs())
    (y.pow(2).sum() if dy is None else (y * dy.abs()).sum()).backward()
    return y.detach(), [t.grad if t is not None else None for t in leaves]


def _roundings(k, n, r, rows):
    """Longest chain: y = x·Wᵀ (k) + b + s·((d(x)·Aᵀ) (k) ·Bᵀ (r)) + the mask, s and adds (4);
    a merged W' = W + s·B·A adds r + 2; the gradients add their sums (n, r or the rows) and 2·y."""
    return 2 * (k + 2 * r + 6) + n + r + rows + 4


shapes = st.fixed_dictionaries(
    {
        "lead": st.sampled_from([(0,), (1,), (7,), (3, 5), (2, 1, 4)]),
        "k": st.integers(1, 24),
        "n": st.integers(1, 24),
        "r": st.integers(1, 9),
        "bias": st.booleans(),
        "p": st.sampled_from([0.0, 0.4]),
        "route": st.sampled_from(list(LinearRoute)),
        "seed": st.integers(0, 2**16),
    }
)


@given(shapes)
def test_reference_op_matches_naive_float64(case):
    if case["p"] > 0 and case["route"] is LinearRoute.MERGE:
        case["route"] = LinearRoute.EPILOGUE
    g = torch.Generator().manual_seed(case["seed"])
    k, n, r = case["k"], case["n"], case["r"]
    x = torch.randn(*case["lead"], k, generator=g, dtype=torch.float64)
    W = torch.randn(n, k, generator=g, dtype=torch.float64)
    b = torch.randn(n, generator=g, dtype=torch.float64) if case["bias"] else None
    A = torch.randn(r, k, generator=g, dtype=torch.float64)
    B = torch.randn(n, r, generator=g, dtype=torch.float64)
    dy = torch.randn(*case["lead"], n, generator=g, dtype=torch.float64)
    scale = 1.7

    torch.manual_seed(case["seed"])
    xs, As, Bs = leaf64(x), leaf64(A), leaf64(B)
    y = reference.lora_linear(xs, W, b, As, Bs, scale, case["p"], route=case["route"])
    y.backward(dy)

    torch.manual_seed(case["seed"])  # the same draws give the same dropout mask
    mask = reference.dropout_keep_mask(x, case["p"]) if case["p"] > 0 else None
    xn, An, Bn = leaf64(x), leaf64(A), leaf64(B)
    y_ref = naive_lora_linear(xn, W, b, An, Bn, scale, mask)
    y_ref.backward(dy)

    bound_y, (bound_x, _, _, bound_A, bound_B) = _abs_oracle(x, W, b, A, B, scale, mask, dy)
    count = _roundings(k, n, r, x.numel() // k)
    assert_within_bound(y, y_ref, bound_y, count, torch.float64, name="y")
    for ours, theirs, bound in ((xs, xn, bound_x), (As, An, bound_A), (Bs, Bn, bound_B)):
        assert_within_bound(ours.grad, theirs.grad, bound, count, torch.float64, name="grad")


@pytest.mark.parametrize(
    "route,p", [(LinearRoute.MERGE, 0.0), (LinearRoute.EPILOGUE, 0.0), (LinearRoute.EPILOGUE, 0.5)]
)
def test_trainable_bias_and_weight_gradients(route, p):
    x, W, b = torch.randn(6, 5, dtype=torch.float64), leaf64(torch.randn(4, 5)), leaf64(torch.randn(4))
    A, B = leaf64(torch.randn(3, 5)), leaf64(torch.randn(4, 3))
    torch.manual_seed(7)
    reference.lora_linear(x, W, b, A, B, 0.5, p, route=route).pow(2).sum().backward()
    torch.manual_seed(7)
    mask = reference.dropout_keep_mask(x, p) if p else None
    W2, b2, A2, B2 = leaf64(W), leaf64(b), leaf64(A), leaf64(B)
    naive_lora_linear(x, W2, b2, A2, B2, 0.5, mask).pow(2).sum().backward()
    _, bounds = _abs_oracle(x, W, b, A, B, 0.5, mask)
    for ours, theirs, bound in zip((W, b, A, B), (W2, b2, A2, B2), bounds[1:]):
        assert_within_bound(ours.grad, theirs.grad, bound, _roundings(5, 4, 3, 6), torch.float64, name="grad")
        assert_bound_can_fail(theirs.grad, bound, _roundings(5, 4, 3, 6), torch.float64)


def test_route_choice_follows_the_cost_model():
    assert reference.choose_linear_route(8192, 512, 512, False) is LinearRoute.MERGE
    assert reference.choose_linear_route(4, 512, 512, False) is LinearRoute.EPILOGUE
    assert reference.choose_linear_route(8192, 512, 512, True) is LinearRoute.EPILOGUE


def _layer(k=12, n=7, r=4, bias=True, dtype=torch.float32, init=False):
    base = nn.Linear(k, n, bias=bias).to(dtype)
    layer = LoraLinear(base, "fc")
    layer.update_layer("default", r=r, scale=2.0, dropout=0.0, init=init)
    layer.active_adapters = ["default"]
    return layer


@pytest.mark.parametrize("rows", [1, 3, 600])  # both routes: 600·(12+7) > 12·7
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_float32_and_float64_against_float64(rows, dtype):
    layer = _layer(dtype=dtype)
    x = torch.randn(rows, 12, dtype=dtype)
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    W, b = layer.base_layer.weight, layer.base_layer.bias
    expected = naive_lora_linear(x.double(), W.double(), b.double(), A.double(), B.double(), 2.0)
    bound = abs_twin(layer)(x.double().abs()).detach()
    assert_within_bound(layer(x), expected, bound, _roundings(12, 7, 4, rows), dtype, computed=1, name="y")
    assert_bound_can_fail(expected, bound, _roundings(12, 7, 4, rows), dtype, computed=1)


def test_non_contiguous_input():
    layer = _layer()
    x = torch.randn(12, 9).t()  # [9, 12] non-contiguous
    assert not x.is_contiguous()
    bound = abs_twin(layer)(x.double().abs()).detach()  # another stride may take another BLAS kernel
    assert_within_bound(layer(x), layer(x.contiguous()), bound, _roundings(12, 7, 4, 9), name="y")


def test_zero_init_equals_base_bit_for_bit():
    layer = _layer(init=True)
    for rows in (1, 5, 2000):
        x = torch.randn(rows, 12)
        assert torch.equal(layer(x), layer.base_layer(x))


def test_wrong_input_dtype_is_named():
    with pytest.raises(TypeError, match="fc: input dtype torch.float64"):
        _layer()(torch.randn(3, 12, dtype=torch.float64))


def test_merge_then_unmerge_restores_weight():
    layer = _layer()
    x = torch.randn(5, 12)
    before, out = layer.base_layer.weight.clone(), layer(x)
    twin = abs_twin(layer)
    bound = twin(x.double().abs()).detach()
    count = _roundings(12, 7, 4, 5)
    layer.merge(["default"])
    assert_within_bound(layer(x), out, bound, count, name="merged")
    assert_within_bound(layer.base_layer(x), out, bound, count, name="merged base")
    assert_bound_can_fail(out, bound, count)
    twin.merge(["default"])  # |W| + s·|B|·|A|
    layer.unmerge()
    # (W + s·B·A) − s·B·A: r + 2 roundings each way, against the exact W
    assert_within_bound(layer.base_layer.weight, before, twin.base_layer.weight, 2 * (4 + 2), computed=1, name="W")
