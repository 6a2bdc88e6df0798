"""DoRA on nn.Linear against the paper's formula, computed independently in float64:
W' = diag(m / ‖W + s·B·A‖)·(W + s·B·A) with the norm detached, y = x·W'ᵀ + b; exact at init;
merge and unmerge; refusals (routing, merging with other adapters, non-Linear targets)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers.linear import LoraLinear

from reference_math import assert_normwise_close
from toy_models import make_batch, make_model

N, K, R, SCALE = 12, 24, 4, 1.5
# Float32 against float64 through a row norm (K squares, a square root), a division and two
# GEMMs of length ≤ K: each result is within a few K·2^-24 ≈ 1.4e-6 of max|y| (no cancellation in
# the norms; the GEMMs' is bounded normwise by their inputs' norms). 2^-14 ≈ 6e-5 leaves a 40×
# margin; plain LoRA in place of DoRA (m moved 30% off its start) is off by O(10^-1).
REL = 2.0**-14


def _layer(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layer = LoraLinear(nn.Linear(K, N).to(dtype), "fc")
    layer.update_layer("default", r=R, scale=SCALE, dropout=0.0, init=True)
    layer.enable_dora("default")
    layer.active_adapters = ["default"]
    return layer


def _train_like(layer, seed=1):
    """Move A, B and m away from their start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B["default"].normal_(0, 0.3, generator=g)
        magnitude = layer.lora_magnitude_vector["default"]
        magnitude.mul_(1 + 0.3 * torch.rand(magnitude.shape, generator=g, dtype=magnitude.dtype))


def _paper(x, W, b, A, B, m, scale):
    """The paper's DoRA output in float64: x·(diag(m/‖V‖)·V)ᵀ + b, V = W + s·B·A, ‖V‖ detached."""
    V = W + scale * B @ A
    return x @ ((m / V.norm(dim=1).detach()).unsqueeze(1) * V).t() + b


def test_a_fresh_dora_adapter_leaves_the_layer_exactly_as_it_was():
    layer = _layer()
    x = torch.randn(7, K)
    assert torch.equal(layer(x), layer.base_layer(x))


def test_forward_and_gradients_match_the_paper_in_float64():
    layer = _layer()
    _train_like(layer)
    x = torch.randn(9, K, requires_grad=True)
    dy = torch.randn(9, N)
    (layer(x) * dy).sum().backward()
    leaves = {
        "x": x,
        "A": layer.lora_A["default"],
        "B": layer.lora_B["default"],
        "m": layer.lora_magnitude_vector["default"],
    }
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    W, b = layer.base_layer.weight.detach().double(), layer.base_layer.bias.detach().double()
    y64 = _paper(ref["x"], W, b, ref["A"], ref["B"], ref["m"], SCALE)
    (y64 * dy.double()).sum().backward()
    assert_normwise_close(layer(x).detach().double(), y64.detach(), rel=REL, name="y")
    for name, leaf in leaves.items():
        assert_normwise_close(leaf.grad.double(), ref[name].grad, rel=REL, name=f"d{name}")
    with torch.no_grad():  # plain LoRA (g = 1) is not what was computed
        lora = _paper(ref["x"], W, b, ref["A"], ref["B"], (W + SCALE * ref["B"] @ ref["A"]).norm(dim=1), SCALE)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_normwise_close(y64.detach(), lora, rel=REL)


def test_merge_writes_the_decomposed_weight_and_unmerge_restores_it():
    """In float64: a handful of roundings of 2^-53 each, far inside 2^-40 (which a merge that
    forgot g, or unmerged without dividing by it, misses by O(10^-1))."""
    layer = _layer(dtype=torch.float64)
    _train_like(layer)
    x = torch.randn(5, K, dtype=torch.float64)
    before, out = layer.base_layer.weight.clone(), layer(x).detach()
    layer.merge(["default"])
    assert_normwise_close(layer.base_layer(x), out, rel=2.0**-40, name="merged")
    layer.unmerge()
    assert_normwise_close(layer.base_layer.weight, before, rel=2.0**-40, name="W")
    assert_normwise_close(layer(x).detach(), out, rel=2.0**-40, name="unmerged again")
    assert not layer.merged_adapters and not layer._merged_dora_scale


def test_a_dora_adapter_merges_alone_and_is_not_routed():
    layer = _layer()
    layer.update_layer("plain", r=2, scale=1.0, dropout=0.0, init=False)
    with pytest.raises(ValueError, match="merges alone"):
        layer.merge(["default", "plain"])
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0"], use_dora=True), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["mlp.0"]))
    with pytest.raises(ValueError, match="routing does not support DoRA"):
        model(*make_batch(batch=4), adapter_ids=torch.tensor([0, 1, -1, 0]))


def test_dora_on_a_table_is_refused_naming_the_module():
    model = make_model()
    with pytest.raises(ValueError, match="use_dora: item is an Embedding; recpeft has DoRA for nn.Linear"):
        get_peft_model(model, LoraConfig(r=2, target_modules=["mlp.0", "item"], use_dora=True))
    assert not any("lora" in n for n, _ in model.named_parameters())  # the model is left as it was


def test_save_and_load_keep_the_magnitude_bit_for_bit(tmp_path):
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0", "mlp.2"], use_dora=True))
    for holder in model.adapter_holders().values():
        _train_like(holder)
    batch = make_batch()
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert loaded.peft_config["default"].use_dora
    assert torch.equal(loaded(*batch), model(*batch))
    assert "base_model.model.mlp.0.lora_magnitude_vector" in model.adapter_state_dict()
