"""PeftModel and the Trainer's optimizer split see adapter holders only through their protocol:
a newly registered wrapper type is handled by what it declares, modules saved whole go through
the same merge / disable / save paths as LoRA layers."""

import torch
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers import LORA_WRAPPERS, LoraLinear, ModulesToSaveWrapper
from recpeft.peft import WEIGHTS_NAME
from recpeft.train.optimizers import sparse_gradient_parameters, split_by_gradient_kind

from reference_math import TINY_FORWARD_ROUNDINGS, abs_inputs, abs_twin, assert_bound_can_fail, assert_within_bound
from toy_models import make_batch, make_model, train_steps


class TaggedLinear(nn.Linear):
    """An ``nn.Linear`` subclass with a wrapper of its own."""


class LoraTaggedLinear(LoraLinear):
    """Declares its A sparse and its untouched entries, as a new wrapper type might: only the
    protocol tells PeftModel and the optimizer split about either."""

    UNTOUCHED = 5

    def sparse_parameters(self, adapter):
        return [self.lora_A[adapter]]

    def untouched_parameters(self, adapter):
        return self.UNTOUCHED


def _tagged_model():
    model = make_model()
    model.dense = TaggedLinear(4, 8)
    return model


def test_sparse_gradient_parameters_asks_every_holder(monkeypatch):
    monkeypatch.setitem(LORA_WRAPPERS, TaggedLinear, LoraTaggedLinear)
    model = get_peft_model(_tagged_model(), LoraConfig(r=2, target_modules=["item", "dense", "mlp.0"]))
    base = model.base_model
    assert isinstance(base.dense, LoraTaggedLinear)
    expected = {id(base.item.lora_A["default"]), id(base.dense.lora_A["default"])}  # not mlp.0's
    assert {id(p) for p in sparse_gradient_parameters(model)} == expected
    _, sparse = split_by_gradient_kind(model)
    assert {id(p) for _, p in sparse} == expected
    counts = model.get_nb_trainable_parameters()
    item_untouched = 60 * 2  # A of item is all zero; dense declares UNTOUCHED; mlp.0 none
    assert counts["touched"] == counts["trainable"] - item_untouched - LoraTaggedLinear.UNTOUCHED


def test_sparse_gradient_parameters_finds_a_sparse_copy_saved_whole():
    model = make_model()
    model.item = nn.Embedding(60, 8, sparse=True)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["history"], modules_to_save=["item"]))
    copy_weight = peft.base_model.item.modules_to_save["default"].weight
    found = {id(p) for p in sparse_gradient_parameters(peft)}
    assert id(copy_weight) in found and id(peft.base_model.history.lora_A["default"]) in found


def test_disable_adapter_with_modules_to_save_and_merged_adapters():
    batch = make_batch()
    config = LoraConfig(r=4, target_modules=["item", "mlp.0"], modules_to_save=["mlp.2"], init_lora_weights=False)
    model = get_peft_model(make_model(), config)
    with torch.no_grad():
        model.base_model.mlp[2].modules_to_save["default"].bias.add_(0.5)  # the copy is not the original
    adapted, base = model(*batch), make_model()(*batch)
    # the bound covers the adapted model's terms and the original mlp.2's (the copy's bias differs)
    bound = (abs_twin(model)(*abs_inputs(*batch)) + abs_twin(make_model())(*abs_inputs(*batch))).detach()
    model.merge_adapter()
    holders = model.adapter_holders()
    assert isinstance(holders["mlp.2"], ModulesToSaveWrapper)
    expected_merged = {"item": ["default"], "mlp.0": ["default"], "mlp.2": []}  # a copy saved whole merges nothing
    assert {n: h.merged_adapters for n, h in holders.items()} == expected_merged
    # Unmerging restores W to rounding (2·(r + 2) roundings of |W| + s·|B|·|A|), so the outputs agree
    # within the bound of the adapted model's absolute-value twin (reference_math.assert_within_bound).
    n = TINY_FORWARD_ROUNDINGS + 2 * (4 + 2)
    with model.disable_adapter():
        assert all(h.disabled and not h.merged_adapters for h in holders.values())
        assert_within_bound(model(*batch), base, bound, n, name="disabled")  # original mlp.2, no delta
        with model.disable_adapter():
            assert_within_bound(model(*batch), base, bound, n, name="disabled twice")
        assert all(h.disabled for h in holders.values())
    assert not any(h.disabled for h in holders.values())
    assert {n: h.merged_adapters for n, h in holders.items()} == expected_merged
    assert_within_bound(model(*batch), adapted, bound, n, name="merged")
    assert_bound_can_fail(adapted, bound, n)
    plain = model.merge_and_unload()
    assert torch.equal(plain.mlp[2].bias, make_model().mlp[2].bias + 0.5)  # the trained copy is kept


def test_save_and_load_go_through_every_holder(tmp_path):
    config = LoraConfig(r=2, target_modules=["item", "mlp.0"], modules_to_save=["mlp.2"], bias="lora_only")
    model = get_peft_model(make_model(), config)
    train_steps(model, steps=2)
    model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).is_file()
    keys = set(model.adapter_state_dict())
    assert {
        "base_model.model.item.lora_embedding_B.weight",
        "base_model.model.mlp.0.lora_A.weight",
        "base_model.model.mlp.0.base_layer.bias",
        "base_model.model.mlp.2.weight",
    } <= keys
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert sorted(loaded.adapter_holders()) == ["item", "mlp.0", "mlp.2"]
    assert torch.equal(loaded(*make_batch(seed=4)), model(*make_batch(seed=4)))
