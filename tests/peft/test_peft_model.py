"""get_peft_model and PeftModel: targeting, freezing, adapters, merging, counting."""

import hashlib

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, LoraEmbeddingBag, LoraLinear, get_peft_model
from recpeft.layers import LoraEmbedding, ModulesToSaveWrapper

from reference_math import (
    TINY_FORWARD_ROUNDINGS,
    abs_inputs,
    abs_twin,
    assert_bound_can_fail,
    assert_normwise_close,
    assert_within_bound,
)
from toy_models import ALL_TARGETS, make_batch, make_model, train_steps

# merged, then unmerged: W comes back within 2·(r + 2) roundings of |W| + s·|B|·|A|
N = TINY_FORWARD_ROUNDINGS + 2 * (4 + 2)


def _bound(model, batch):
    """The absolute-value twin's output: the bound of reference_math.assert_within_bound; taken
    on the unmerged adapted model, its terms cover the base's and the merged weights' too."""
    return abs_twin(model)(*abs_inputs(*batch)).detach()


def _checksums(model):
    return {n: hashlib.sha256(p.detach().numpy().tobytes()).hexdigest() for n, p in model.state_dict().items()}


def test_wraps_targets_and_freezes_every_base_parameter():
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS))
    base = model.base_model
    assert isinstance(base.history, LoraEmbeddingBag) and isinstance(base.item, LoraEmbedding)
    assert isinstance(base.mlp[0], LoraLinear) and isinstance(base.dense, LoraLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert len(trainable) == 2 * len(ALL_TARGETS)


def test_zero_init_equals_base_bit_for_bit():
    batch = make_batch()
    expected = make_model()(*batch)
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS))
    assert torch.equal(model(*batch), expected)


def test_training_changes_output_and_leaves_the_frozen_base_unchanged():
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS))
    base_before = _checksums(make_model())
    batch = make_batch(seed=99)
    before = model(*batch).detach()
    train_steps(model, steps=3)
    assert not torch.allclose(model(*batch), before)
    unwrapped = model.unload()
    assert _checksums(unwrapped) == base_before


def test_target_forms_suffix_regex_and_classes():
    by_suffix = get_peft_model(make_model(), LoraConfig(target_modules=["0"]))
    assert list(by_suffix.lora_layers()) == ["mlp.0"]
    by_regex = get_peft_model(make_model(), LoraConfig(target_modules=r"mlp\.\d"))
    assert sorted(by_regex.lora_layers()) == ["mlp.0", "mlp.2"]
    by_class = get_peft_model(make_model(), LoraConfig(target_modules=[nn.Embedding, nn.EmbeddingBag]))
    assert sorted(by_class.lora_layers()) == ["history", "item"]
    excluded = get_peft_model(make_model(), LoraConfig(target_modules=[nn.Linear], exclude_modules=["dense"]))
    assert sorted(excluded.lora_layers()) == ["mlp.0", "mlp.2"]


def test_pattern_that_matches_nothing_names_the_candidates():
    with pytest.raises(
        ValueError, match=r"'mlp\.1x' matched no module.*Did you mean: mlp\.1.*Adaptable modules: history"
    ):
        get_peft_model(make_model(), LoraConfig(target_modules=["mlp.1x"]))
    with pytest.raises(ValueError, match="regex entry 'tower.*' matched no module"):
        get_peft_model(make_model(), LoraConfig(target_modules="tower.*"))


def test_unsupported_match_lists_what_is_adaptable_inside():
    model = make_model()
    with pytest.raises(ValueError, match=r"'mlp' is a Sequential.*inside it: mlp\.0, mlp\.2"):
        get_peft_model(model, LoraConfig(target_modules=["mlp"]))
    with pytest.raises(ValueError, match="'mlp.1' is a ReLU"):
        get_peft_model(model, LoraConfig(target_modules=["mlp.1"]))
    assert not any(p.requires_grad is False for p in model.parameters())  # nothing was frozen


def test_rank_and_alpha_patterns_and_rslora():
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=ALL_TARGETS,
        rank_pattern={r"mlp\.\d": 2},
        alpha_pattern={"item": 3},
        use_rslora=True,
    )
    model = get_peft_model(make_model(), config)
    layers = model.lora_layers()
    assert layers["mlp.0"].lora_A["default"].shape == (2, 24)
    assert layers["history"].lora_A["default"].shape == (60, 4)
    assert layers["mlp.0"].scaling["default"] == pytest.approx(8 / 2**0.5)
    assert layers["item"].scaling["default"] == pytest.approx(3 / 2)


def test_adapters_add_set_delete_and_disable():
    batch = make_batch()
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS, init_lora_weights=False))
    base_out = make_model()(*batch)
    first = model(*batch)
    model.add_adapter("other", LoraConfig(r=2, target_modules=["mlp.2"], init_lora_weights=False))
    assert model.adapter_names == ("default", "other")
    assert torch.equal(model(*batch), first)  # adding does not activate
    model.set_adapter("other")
    second = model(*batch)
    assert not torch.allclose(second, first)
    with model.disable_adapter():
        assert torch.equal(model(*batch), base_out)
    assert torch.equal(model(*batch), second)
    model.set_adapter(["default", "other"])  # deltas add up
    both = model(*batch)
    assert not torch.allclose(both, first) and not torch.allclose(both, second)
    model.delete_adapter("other")
    assert model.adapter_names == ("default",) and model.active_adapters == ["default"]
    assert torch.equal(model(*batch), first)
    with pytest.raises(KeyError, match="unknown adapter 'nope'"):
        model.set_adapter("nope")


def test_merge_unmerge_and_merge_and_unload():
    batch = make_batch()
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS, init_lora_weights=False))
    weights = {n: p.clone() for n, p in model.base_model.named_parameters() if "base_layer" in n}
    out, bound, twin = model(*batch), _bound(model, batch), abs_twin(model)
    model.merge_adapter()
    assert_within_bound(model(*batch), out, bound, N, name="merged")
    assert_bound_can_fail(out, bound, N)
    with model.disable_adapter():  # unmerges meanwhile
        assert_within_bound(model(*batch), make_model()(*batch), bound, N, name="disabled")
    model.unmerge_adapter()
    twin.merge_adapter()  # |W| + s·|B|·|A|
    twin_weights = dict(twin.base_model.named_parameters())
    for name, p in model.base_model.named_parameters():
        if name in weights:  # (W + s·B·A) − s·B·A: r + 2 roundings each way
            assert_within_bound(p, weights[name], twin_weights[name], 2 * (4 + 2), computed=1, name=name)
    plain = model.merge_and_unload()
    assert not any(isinstance(m, (LoraLinear, LoraEmbedding)) for m in plain.modules())
    assert_within_bound(plain(*batch), out, bound, N, name="merged and unloaded")


def test_print_trainable_parameters_reports_allocated_and_touched(capsys):
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=["item", "mlp.0"]))
    counts = model.get_nb_trainable_parameters()
    item_a, item_b, lin = 60 * 4, 4 * 8, 4 * 24 + 16 * 4
    assert counts["trainable"] == item_a + item_b + lin
    assert counts["touched"] == item_b + lin  # A of the table is still all zero
    assert counts["all"] == sum(p.numel() for p in make_model().parameters()) + counts["trainable"]
    train_steps(model, steps=1)
    used_rows = torch.unique(make_batch(seed=1)[1]).numel()
    assert model.get_nb_trainable_parameters()["touched"] == used_rows * 4 + item_b + lin
    model.print_trainable_parameters()
    line = capsys.readouterr().out
    assert f"trainable params: {counts['trainable']:,}" in line and "touched by training" in line


def test_modules_to_save_and_bias_train_and_are_saved():
    config = LoraConfig(r=2, target_modules=["mlp.0"], modules_to_save=["mlp.2"], bias="lora_only")
    model = get_peft_model(make_model(), config)
    assert isinstance(model.base_model.mlp[2], ModulesToSaveWrapper)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "base_model.mlp.0.base_layer.bias" in trainable
    assert "base_model.mlp.2.modules_to_save.default.weight" in trainable
    assert "base_model.mlp.2.original_module.weight" not in trainable
    original = model.base_model.mlp[2].original_module.weight.clone()
    train_steps(model, steps=2)
    assert torch.equal(model.base_model.mlp[2].original_module.weight, original)
    keys = set(model.adapter_state_dict())
    assert {"base_model.model.mlp.0.base_layer.bias", "base_model.model.mlp.2.weight"} <= keys


def test_bias_all_trains_every_bias():
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0"], bias="all"))
    biases = {n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")}
    assert biases == {"base_model.dense.bias", "base_model.mlp.0.base_layer.bias", "base_model.mlp.2.bias"}


def test_trained_biases_survive_other_adapters_wrapping_their_modules():
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["item"], bias="all"), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["mlp.0"]))  # wraps mlp.0: its bias moves
    assert model.base_model.mlp[0].base_layer.bias.requires_grad
    assert "base_model.model.mlp.0.bias" in model.adapter_state_dict("a")
    model.delete_adapter("b")  # unwraps it again
    assert model.base_model.mlp[0].bias.requires_grad
    assert "base_model.model.mlp.0.bias" in model.adapter_state_dict("a")


def test_bias_all_leaves_a_module_saved_whole_frozen():
    model = get_peft_model(
        make_model(), LoraConfig(r=2, target_modules=["mlp.0"], modules_to_save=["mlp.2"], bias="all")
    )
    wrapper = model.base_model.mlp[2]
    assert not wrapper.original_module.bias.requires_grad
    assert wrapper.modules_to_save["default"].bias.requires_grad
    with torch.no_grad():
        wrapper.modules_to_save["default"].bias.fill_(3.0)
    # HF PEFT's layout: the copy's tensors under the module's own name, once (not the original's)
    state = model.adapter_state_dict()
    assert [k for k in state if k.startswith("base_model.model.mlp.2.")] == [
        "base_model.model.mlp.2.weight",
        "base_model.model.mlp.2.bias",
    ]
    assert torch.equal(state["base_model.model.mlp.2.bias"], torch.full((1,), 3.0))


def test_set_adapter_after_merging_unmerges_the_adapter_that_leaves():
    batch = make_batch()
    config = LoraConfig(r=4, target_modules=ALL_TARGETS, init_lora_weights=False)
    model = get_peft_model(make_model(), config, "a")
    model.add_adapter("b", config)
    model.set_adapter("b")
    only_b = model(*batch)
    model.set_adapter(["a", "b"])
    bound = _bound(model, batch)  # terms of both adapters: "a" leaves its weights within rounding
    model.set_adapter("a")
    model.merge_adapter()
    model.set_adapter("b")
    assert_within_bound(model(*batch), only_b, bound, N, name="only b")


def test_disable_adapter_blocks_nest():
    batch = make_batch()
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS, init_lora_weights=False))
    base_out, adapted = make_model()(*batch), model(*batch)
    with model.disable_adapter():
        with model.disable_adapter():
            assert torch.equal(model(*batch), base_out)
        assert torch.equal(model(*batch), base_out)
    assert torch.equal(model(*batch), adapted)


def test_adapters_with_different_dropouts_combine_in_eval_only():
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0"], lora_dropout=0.1), "a")
    model.add_adapter("b", LoraConfig(r=2, target_modules=["mlp.0"], lora_dropout=0.3))
    model.set_adapter(["a", "b"])
    model.eval()
    model(*make_batch())
    model.train()
    with pytest.raises(ValueError, match="must share one lora_dropout to train together"):
        model(*make_batch())


def test_autocast_runs_the_adapter_in_the_autocast_dtype():
    batch = make_batch()
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS, init_lora_weights=False))
    full = model(*batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = model(*batch)
    assert low.dtype == torch.bfloat16
    # bf16 (u = 2^-8) along the chain: each of the ≤ 8 matrix products (base, A, B of three layers,
    # and the bag's) rounds its two operands and its output, 24 roundings; float32 ones are 2^16×
    # smaller. That componentwise bound holds ...
    bound = _bound(model, batch)
    assert_within_bound(low, full, bound, 24 + 1, torch.bfloat16, computed=1, name="autocast")
    # ... but at 0.09·Σ|terms| it would pass a zeroed output, so a normwise floor discriminates:
    # measured ≤ 1.3e-2 (≈ 3.3 u) of max|full| over seeds; 2^-3 leaves 10×, a zeroed output or a
    # missing adapter (relative O(1)) fails.
    assert_normwise_close(low, full, rel=2.0**-3, name="autocast")
    with pytest.raises(AssertionError, match="exceeds"):
        assert_normwise_close(torch.zeros_like(full), full, rel=2.0**-3)


def test_adapters_added_one_by_one_leave_what_a_full_refresh_would():
    """add_adapter touches only the new adapter's parameters (no walk over the others): the
    trainable flags, and the holders found without descending into wrappers, equal what a full
    walk gives — with LoRA layers, a module saved whole, a trained bias and an inference-only
    adapter among them."""
    from recpeft.layers import AdapterHolder

    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=ALL_TARGETS[:3]), "a")
    model.add_adapter("b", LoraConfig(r=3, target_modules=["mlp.0"], modules_to_save=["mlp.2"], bias="lora_only"))
    model.add_adapter("c", LoraConfig(r=2, target_modules=ALL_TARGETS[:4], inference_mode=True))
    model.add_adapter("d", LoraConfig(r=4, target_modules=["item"]))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    assert any(flags.values()) and not all(flags.values())
    holders = model.adapter_holders().values()
    assert not any(p.requires_grad for h in holders if h.has_adapter("c") for p in h.adapter_parameters("c"))
    assert all(p.requires_grad for h in holders if h.has_adapter("d") for p in h.adapter_parameters("d"))
    model._refresh_trainable()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    walked = {n: m for n, m in model.base_model.named_modules() if isinstance(m, AdapterHolder)}
    assert model.adapter_holders() == walked and len(walked) >= 4
