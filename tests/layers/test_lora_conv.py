"""LoRA on nn.Conv1d / nn.Conv2d against the float64 formula written here with plain convolutions
and einsums: y = conv(x; W) + b + s·B(A(d(x))), A a convolution like the base's, B pointwise;
gradients of x, A and B; merge W' = W + s·B⊗A and unmerge; zero init; several adapters; routing
against each sample through its own adapter; DoRA per output channel; the model level (targeting,
``"all-linear"``, save and load, refusals)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers import LoraConv
from recpeft.layers.routing import routed

from conv_models import CONV_TARGETS, make_cnn, make_images, perturb_trainable
from reference_math import assert_bound_can_fail, assert_normwise_close, assert_within_bound, leaf64

R, SCALE = 3, 1.5
CONV = {1: F.conv1d, 2: F.conv2d}

# (module, input shape): kernels, strides, paddings and dilations of every kind, a 1×1, no bias,
# and odd sizes; zero padding (the other padding modes: test_other_padding_modes_merge_exactly)
CASES = {
    "2d strided dilated": (
        lambda: nn.Conv2d(3, 5, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2)),
        (4, 3, 9, 7),
    ),
    "1d dilated padded": (lambda: nn.Conv1d(4, 6, 3, padding=2, dilation=2), (3, 4, 11)),
    "2d 1x1": (lambda: nn.Conv2d(2, 3, 1), (2, 2, 5, 5)),
    "1d strided no bias": (lambda: nn.Conv1d(5, 4, 4, stride=3, bias=False), (5, 5, 13)),
}


def _layer(make, dtype=torch.float32, init=False, seed=0, adapters=("default",)):
    torch.manual_seed(seed)
    layer = LoraConv(make().to(dtype).requires_grad_(False), "conv")
    for name in adapters:
        layer.update_layer(name, r=R, scale=SCALE, dropout=0.0, init=init)
    layer.active_adapters = [adapters[0]]
    return layer


def _geometry(module):
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation}


def naive_delta(A, B, scale):
    """s·B⊗A: delta[o, i, k…] = s·Σ_r B[o, r]·A[r, i, k…]."""
    return scale * torch.einsum("or,ri...->oi...", B.flatten(1), A)


def naive_conv_lora(x, W, b, A, B, scale, module):
    """conv(x; W) + b + s·B(A(x)), B applied as an einsum over channels."""
    conv, geometry = CONV[W.dim() - 2], _geometry(module)
    u = conv(x, A, None, **geometry)
    return conv(x, W, b, **geometry) + scale * torch.einsum("or,br...->bo...", B.flatten(1), u)


def _roundings(module, x_shape, y_shape):
    """Forward: a dot of length K = I·Πk (conv), another (A), one of length r (B), ·s, + base,
    + bias; counted as 2(K + r) + 8. A gradient adds its sum over the batch and the output
    positions, and over O (Bᵀ·dY) or r."""
    K = module.weight[0].numel()
    forward = 2 * (K + R) + 8
    return forward, forward + y_shape[0] * y_shape[2:].numel() + module.out_channels + R + 8


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_and_gradients_match_the_float64_formula_within_the_rounding_bound(case):
    make, x_shape = case
    layer = _layer(make)
    module = layer.base_layer
    x = torch.randn(x_shape, requires_grad=True)
    y = layer(x)
    dy = torch.randn(y.shape)
    (y * dy).sum().backward()
    A, B = layer.lora_A["default"], layer.lora_B["default"]
    W, b = module.weight.detach().double(), None if module.bias is None else module.bias.detach().double()

    ref = {name: leaf64(t) for name, t in (("x", x), ("A", A), ("B", B))}
    expected = naive_conv_lora(ref["x"], W, b, ref["A"], ref["B"], SCALE, module)
    (expected * dy.double()).sum().backward()
    # The bound of reference_math.assert_within_bound: the same formula on absolute values.
    absolute = {name: leaf64(t.abs()) for name, t in (("x", x), ("A", A), ("B", B))}
    bound = naive_conv_lora(
        absolute["x"], W.abs(), None if b is None else b.abs(), absolute["A"], absolute["B"], SCALE, module
    )
    (bound * dy.double().abs()).sum().backward()

    n_forward, n_grad = _roundings(module, x_shape, y.shape)
    assert_within_bound(y, expected, bound, n_forward, computed=1, name="y")
    assert_bound_can_fail(expected, bound, n_forward, computed=1, name="y")
    for name, got in (("x", x.grad), ("A", A.grad), ("B", B.grad)):
        assert_within_bound(got, ref[name].grad, absolute[name].grad, n_grad, computed=1, name=f"d{name}")
        assert_bound_can_fail(ref[name].grad, absolute[name].grad, n_grad, computed=1, name=f"d{name}")


@pytest.mark.parametrize("init", [True, "gaussian"])
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_a_fresh_adapter_leaves_the_layer_exactly_as_it_was(case, init):
    make, x_shape = case
    layer = _layer(make, init=init)
    assert layer.lora_A["default"].abs().sum() > 0  # A random, B zero: the product is what is zero
    x = torch.randn(x_shape)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_merge_adds_s_b_times_a_and_unmerge_restores_the_weight(case):
    """Float64, two adapters active: the merged layer equals the adapted one and W' − W the
    einsum delta, to a handful of roundings of 2^-53 (2^-40 normwise leaves a wide margin; a
    transposed or missing delta is off by O(1))."""
    make, x_shape = case
    layer = _layer(make, dtype=torch.float64, adapters=("a", "b"))
    layer.active_adapters = ["a", "b"]
    x = torch.randn(x_shape, dtype=torch.float64)
    before, adapted = layer.base_layer.weight.clone(), layer(x).detach()
    layer.merge(["a", "b"])
    expected_delta = sum(naive_delta(layer.lora_A[a], layer.lora_B[a], SCALE) for a in ("a", "b")).detach()
    assert_normwise_close(layer.base_layer.weight - before, expected_delta, rel=2.0**-40, name="W' - W")
    assert_normwise_close(layer.base_layer(x), adapted, rel=2.0**-40, name="merged")
    assert torch.equal(layer(x), layer.base_layer(x))  # merged adapters do not run again
    layer.unmerge()
    assert_normwise_close(layer.base_layer.weight, before, rel=2.0**-40, name="W")
    assert_normwise_close(layer(x).detach(), adapted, rel=2.0**-40, name="unmerged again")


@pytest.mark.parametrize("padding_mode", ["reflect", "circular", "replicate"])
def test_other_padding_modes_merge_exactly(padding_mode):
    """A pads as the base does, so B(A(x)) is the delta's convolution whatever the padding mode."""
    layer = _layer(lambda: nn.Conv2d(2, 4, 3, padding=2, dilation=2, padding_mode=padding_mode), torch.float64)
    x = torch.randn(3, 2, 6, 5, dtype=torch.float64)
    adapted = layer(x).detach()
    assert not torch.allclose(adapted, layer.base_layer(x), atol=1e-3)
    layer.merge(["default"])
    assert_normwise_close(layer.base_layer(x), adapted, rel=2.0**-40, name="merged")


def test_dropout_drops_the_adapter_input_only():
    torch.manual_seed(0)
    layer = LoraConv(nn.Conv1d(4, 3, 3, padding=1).double().requires_grad_(False), "conv")
    layer.update_layer("default", r=R, scale=SCALE, dropout=0.5, init=False)
    layer.active_adapters = ["default"]
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)  # the layer draws its one dropout mask as F.dropout does
    dropped = F.dropout(x, 0.5, training=True)
    base, A, B = layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]
    expected = base(x) + SCALE * torch.einsum("or,br...->bo...", B.flatten(1), F.conv1d(dropped, A, padding=1))
    assert_normwise_close(y, expected, rel=2.0**-40, name="y")
    layer.eval()
    assert_normwise_close(layer(x), naive_conv_lora(x, base.weight, base.bias, A, B, SCALE, base), rel=2.0**-40)


def test_routing_equals_each_sample_through_its_own_adapter_forward_and_backward():
    layer = _layer(CASES["2d strided dilated"][0], torch.float64, adapters=("a", "b"))
    x = torch.randn(5, 3, 9, 7, dtype=torch.float64)
    ids = torch.tensor([1, 0, -1, 1, 0])
    with routed(ids, ("a", "b")):
        y = layer(x)
    dy = torch.randn(y.shape, dtype=torch.float64)
    (y * dy).sum().backward()
    routed_grads = {n: layer.lora_A[n].grad.clone() for n in ("a", "b")}
    layer.zero_grad()
    rows = []
    for i, a in enumerate(ids.tolist()):
        layer.active_adapters = [] if a < 0 else [("a", "b")[a]]
        rows.append(layer(x[i : i + 1]))
        if a >= 0:
            (rows[-1] * dy[i : i + 1]).sum().backward()
    assert_normwise_close(y, torch.cat(rows), rel=2.0**-40, name="routed")
    for n in ("a", "b"):
        assert_normwise_close(routed_grads[n], layer.lora_A[n].grad, rel=2.0**-40, name=f"dA_{n}")
    with routed(ids, ("a", "b")), pytest.raises(ValueError, match="conv: per-sample routing needs batched input"):
        layer(x[0])


# ---- DoRA ----------------------------------------------------------------------------------------


def _paper(x, W, b, A, B, m, scale, module):
    """DoRA in float64: conv(x; diag(m/‖V‖)·V) + b, V = W + s·B⊗A, ‖V‖ over (I, k…) detached."""
    V = W + naive_delta(A, B, scale)
    g = m.reshape(-1) / torch.linalg.vector_norm(V, dim=tuple(range(1, V.dim()))).detach()
    return CONV[W.dim() - 2](x, g.view(-1, *[1] * (V.dim() - 1)) * V, b, **_geometry(module))


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_dora_forward_and_gradients_match_the_paper_in_float64(case):
    """Float32 against float64 through a norm over K = I·Πk ≤ 24 squares, a division and
    convolutions of length ≤ K: each result within a few K·2^-24 of its scale. 2^-14 leaves a
    wide margin; plain LoRA in place of DoRA (m moved 30% off its start) is off by O(10^-1)."""
    make, x_shape = case
    layer = _layer(make)
    layer.enable_dora("default")
    m = layer.lora_magnitude_vector["default"]
    assert m.shape == (1, layer.base_layer.out_channels, *[1] * (len(x_shape) - 2))  # HF PEFT's shape
    with torch.no_grad():
        m.mul_(1 + 0.3 * torch.rand(m.shape))
    x = torch.randn(x_shape, requires_grad=True)
    y = layer(x)
    dy = torch.randn(y.shape)
    (y * dy).sum().backward()
    leaves = {"x": x, "A": layer.lora_A["default"], "B": layer.lora_B["default"], "m": m}
    ref = {k: leaf64(v) for k, v in leaves.items()}
    module = layer.base_layer
    W, b = module.weight.detach().double(), None if module.bias is None else module.bias.detach().double()
    expected = _paper(ref["x"], W, b, ref["A"], ref["B"], ref["m"], SCALE, module)
    (expected * dy.double()).sum().backward()
    assert_normwise_close(y, expected, rel=2.0**-14, name="y")
    for name, leaf in leaves.items():
        assert_normwise_close(leaf.grad, ref[name].grad, rel=2.0**-14, name=f"d{name}")


def test_dora_starts_exact_merges_alone_and_unmerges():
    layer = _layer(CASES["1d dilated padded"][0], torch.float64, init=True, adapters=("default", "plain"))
    layer.enable_dora("default")
    x = torch.randn(3, 4, 11, dtype=torch.float64)
    assert torch.equal(layer(x), layer.base_layer(x))
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.3)
        layer.lora_magnitude_vector["default"].mul_(1.2)
    before, adapted = layer.base_layer.weight.clone(), layer(x).detach()
    with pytest.raises(ValueError, match="DoRA adapter 'default' merges alone"):
        layer.merge(["default", "plain"])
    layer.merge(["default"])
    assert_normwise_close(layer.base_layer(x), adapted, rel=2.0**-40, name="merged")
    layer.unmerge()
    assert_normwise_close(layer.base_layer.weight, before, rel=2.0**-40, name="W")
    with (
        routed(torch.tensor([0, 1, 0]), ("default", "plain")),
        pytest.raises(ValueError, match="does not support DoRA"),
    ):
        layer(x)


# ---- the model level -----------------------------------------------------------------------------


def test_target_modules_name_conv_layers_and_all_linear_picks_none_of_them():
    model = get_peft_model(make_cnn(), LoraConfig(r=2, target_modules=CONV_TARGETS))
    assert {n: type(m) for n, m in model.lora_layers().items()} == {"stem": LoraConv, "seq": LoraConv}
    by_regex = get_peft_model(make_cnn(), LoraConfig(r=2, target_modules=r".*(stem|seq)"))
    assert sorted(by_regex.lora_layers()) == ["seq", "stem"]
    all_linear = get_peft_model(make_cnn(), LoraConfig(r=2, target_modules="all-linear"))
    assert sorted(all_linear.lora_layers()) == ["head"]  # HF PEFT's all-linear: nn.Linear only


def test_save_and_load_keep_the_adapter_in_hf_peft_keys(tmp_path):
    model = get_peft_model(make_cnn(), LoraConfig(r=2, target_modules=CONV_TARGETS))
    perturb_trainable(model, seed=3)
    images = make_images()
    expected = model(images)
    assert not torch.allclose(expected, make_cnn()(images), atol=1e-3)
    model.save_pretrained(tmp_path)
    shapes = {k: tuple(v.shape) for k, v in model.adapter_state_dict().items()}
    assert shapes == {
        "base_model.model.stem.lora_A.weight": (2, 3, 3, 3),
        "base_model.model.stem.lora_B.weight": (6, 2, 1, 1),
        "base_model.model.seq.lora_A.weight": (2, 6, 3),
        "base_model.model.seq.lora_B.weight": (5, 2, 1),
    }
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"  # HF PEFT's layout: HF PEFT loads the file (tests/hf/test_hf_peft_conv.py)
    loaded = PeftModel.from_pretrained(make_cnn(), tmp_path)
    assert torch.equal(loaded(images), expected)


def test_grouped_convolutions_are_refused_naming_the_module():
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="^0: Conv2d with groups=2; LoRA on a convolution needs groups=1$"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["0"]))
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_weighted_cat_combination_of_conv_adapters_is_the_weighted_sum_of_their_deltas():
    """``cat`` stacks the factors on the matrix form (A [r, I·Πk], B [O, r]): Δ' = Σ w_i·Δ_i."""
    model = get_peft_model(make_cnn(), LoraConfig(r=2, lora_alpha=4, target_modules=CONV_TARGETS), "a")
    model.add_adapter("b", LoraConfig(r=3, lora_alpha=3, target_modules=CONV_TARGETS))
    perturb_trainable(model, seed=5)
    model.add_weighted_adapter(["a", "b"], [0.7, -0.4], "ab", combination_type="cat")
    for name, layer in model.lora_layers().items():
        delta = {a: layer.delta_weight(a, layer.scaling[a]).double() for a in ("a", "b", "ab")}
        assert layer.lora_A["ab"].shape[0] == 5
        assert_normwise_close(delta["ab"], 0.7 * delta["a"] - 0.4 * delta["b"], rel=2.0**-20, name=name)
