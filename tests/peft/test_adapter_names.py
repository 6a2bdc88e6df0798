"""Adapter names are checked when an adapter is created, not when it is saved; and a model that
already holds adapters cannot be wrapped a second time (a notebook cell run twice)."""

import os

import pytest
import torch

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers import AdapterHolder
from recpeft.peft import CONFIG_NAME, WEIGHTS_NAME

from toy_models import make_batch, make_model, train_steps

BAD_NAMES = ["a\0b", "a/b", "../x", "a\\b", "..", ".", "", "v1.2", os.sep + "tmp"] + (
    [f"a{os.altsep}b"] if os.altsep else []
)


def _config(**kwargs):
    return LoraConfig(r=2, target_modules=["mlp.0"], init_lora_weights=False, **kwargs)


def _holders(model):
    return [n for n, m in model.named_modules() if isinstance(m, AdapterHolder)]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_by_get_peft_model_and_leave_the_model_alone(name):
    model = make_model()
    with pytest.raises(ValueError, match="adapter name") as info:
        get_peft_model(model, _config(), adapter_name=name)
    assert "\n" not in str(info.value)
    assert _holders(model) == [] and all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_by_add_adapter_before_anything_is_wrapped(name):
    model = get_peft_model(make_model(), _config())
    before = _holders(model)
    with pytest.raises(ValueError, match="adapter name"):
        model.add_adapter(name, LoraConfig(r=2, target_modules=["mlp.2"]))
    assert model.adapter_names == ("default",) and _holders(model) == before


@pytest.mark.parametrize("name", ["a\0b", "../x", "a\\b", ".."])
def test_bad_names_are_refused_on_load_before_reading_files(tmp_path, name):
    get_peft_model(make_model(), _config()).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()  # a name check that ran after reading would say "no adapter_model"
    with pytest.raises(ValueError, match="adapter name"):
        PeftModel.from_pretrained(make_model(), tmp_path, adapter_name=name)
    model = get_peft_model(make_model(), _config())
    with pytest.raises(ValueError, match="adapter name"):
        model.load_adapter(tmp_path, name)
    assert model.adapter_names == ("default",)


def test_a_model_with_adapters_cannot_be_wrapped_again(tmp_path):
    """Before: the second call re-initialised the first adapter in place, and the first
    PeftModel then saved a file that did not load."""
    base = make_model()
    first = get_peft_model(base, _config())
    train_steps(first, steps=2)
    weights = {n: p.detach().clone() for n, p in first.named_parameters()}
    with pytest.raises(ValueError, match=r"already holds adapters.*add_adapter") as info:
        get_peft_model(base, _config())
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="already holds adapters"):
        get_peft_model(first, _config())  # the PeftModel itself
    assert all(torch.equal(p, weights[n]) for n, p in first.named_parameters())  # nothing re-initialised
    first.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="already holds adapters"):
        PeftModel.from_pretrained(base, tmp_path)  # loading into it would re-initialise it too
    assert all(torch.equal(p, weights[n]) for n, p in first.named_parameters())
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert torch.equal(loaded(*make_batch()), first(*make_batch()))


def test_after_unload_the_model_can_be_wrapped_again():
    base = make_model()
    first = get_peft_model(base, _config())
    plain = first.unload()
    again = get_peft_model(plain, _config())
    assert again.adapter_names == ("default",)


def test_good_names_still_work(tmp_path):
    model = get_peft_model(make_model(), _config(), adapter_name="DE_2026-v2")
    model.add_adapter("fr", LoraConfig(r=2, target_modules=["mlp.2"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    other = get_peft_model(make_model(), _config())
    other.load_adapter(tmp_path / "fr", "fr")
    assert other.adapter_names == ("default", "fr")
