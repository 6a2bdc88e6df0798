"""save_pretrained / from_pretrained / load_adapter: round trips, the sparse embedding form, and
bad files that must raise a clear error and leave the model as it was."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.layers import LoraLayer
from recpeft.layers.base import AdapterStateError
from recpeft.peft import CONFIG_NAME, WEIGHTS_NAME

from toy_models import ALL_TARGETS, make_batch, make_model, train_steps


def _trained(tmp_path, **config):
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS, **config))
    train_steps(model, steps=3)
    model.save_pretrained(tmp_path)
    return model


def _assert_untouched(model):
    assert not any(isinstance(m, LoraLayer) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    assert torch.equal(model(*make_batch()), make_model()(*make_batch()))


def test_round_trip_reproduces_outputs(tmp_path):
    model = _trained(tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == sorted([CONFIG_NAME, WEIGHTS_NAME])  # no temporary files left
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    batch = make_batch(seed=7)
    assert torch.equal(loaded(*batch), model(*batch))
    assert not any(p.requires_grad for p in loaded.parameters())  # inference by default
    trainable = PeftModel.from_pretrained(make_model(), tmp_path, is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_config_json_uses_hf_peft_keys(tmp_path):
    _trained(tmp_path, lora_alpha=16, rank_pattern={"mlp.0": 2})
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    # ALL_TARGETS holds embedding tables: recpeft's own format (tests/hf: HF PEFT refuses it)
    assert data["peft_type"] == "RECPEFT_LORA" and data["r"] == 4 and data["lora_alpha"] == 16
    assert data["target_modules"] == ALL_TARGETS and data["rank_pattern"] == {"mlp.0": 2}
    assert data["bias"] == "none" and data["use_dora"] is False and data["fan_in_fan_out"] is False


def test_embedding_adapter_is_stored_as_touched_rows(tmp_path):
    model = _trained(tmp_path)
    tensors = load_file(str(tmp_path / WEIGHTS_NAME))
    indices = tensors["base_model.model.item.lora_embedding_A.indices"]
    rows = tensors["base_model.model.item.lora_embedding_A.rows"]
    a = model.base_model.item.lora_A["default"]
    expected = (a != 0).any(1).nonzero().squeeze(1)
    assert torch.equal(indices, expected) and 0 < indices.numel() < a.shape[0]
    assert torch.equal(rows, a[expected].detach())
    assert "base_model.model.item.lora_embedding_A.weight" not in tensors


def test_adapter_classes_are_saved_as_module_names(tmp_path):
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=[nn.Linear], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["target_modules"] == ["dense", "mlp.0", "mlp.2"]
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert torch.equal(loaded(*make_batch()), model(*make_batch()))


def test_several_adapters_save_to_subfolders_and_load_by_name(tmp_path):
    model = _trained(tmp_path)
    model.add_adapter("fr", LoraConfig(r=2, target_modules=["mlp.2"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "fr" / WEIGHTS_NAME).is_file()
    other = PeftModel.from_pretrained(make_model(), tmp_path)
    other.load_adapter(tmp_path / "fr", "fr")
    assert other.adapter_names == ("default", "fr")
    model.set_adapter("fr"), other.set_adapter("fr")
    assert torch.equal(other(*make_batch()), model(*make_batch()))


def _rewrite(path, edit):
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t.update({"base_model.model.mlp.0.lora_A.weight": torch.zeros(4, 7)}),
            r"mlp\.0\.lora_A\.weight has shape \(4, 7\) but the model expects \(4, 24\)",
        ),
        (lambda t: t.pop("base_model.model.mlp.2.lora_B.weight"), r"missing key mlp\.2\.lora_B\.weight"),
        (
            lambda t: t.update({"base_model.model.tower.lora_A.weight": torch.zeros(1)}),
            "unexpected key base_model.model.tower",
        ),
        (
            lambda t: t.update({"base_model.model.item.lora_embedding_A.shape": torch.tensor([61, 4])}),
            r"saved for a table of shape \(61, 4\) but the model's is \(60, 4\)",
        ),
    ],
)
def test_mismatched_file_names_the_first_bad_key_and_leaves_the_model(tmp_path, edit, message):
    _trained(tmp_path)
    _rewrite(tmp_path / WEIGHTS_NAME, edit)
    target = make_model()
    with pytest.raises(AdapterStateError, match=message):
        PeftModel.from_pretrained(target, tmp_path)
    _assert_untouched(target)


def test_wrong_base_model_shape_is_named(tmp_path):
    _trained(tmp_path)
    other = make_model()
    other.mlp[0] = nn.Linear(24, 20)
    with pytest.raises(
        AdapterStateError, match=r"mlp\.0\.lora_B\.weight has shape \(16, 4\) but the model expects \(20, 4\)"
    ):
        PeftModel.from_pretrained(other, tmp_path)
    assert isinstance(other.mlp[0], nn.Linear)


def test_corrupted_file_is_refused(tmp_path):
    _trained(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:-40])
    target = make_model()
    with pytest.raises(ValueError, match="is not a readable safetensors file"):
        PeftModel.from_pretrained(target, tmp_path)
    _assert_untouched(target)


def test_non_finite_weights_are_refused(tmp_path):
    _trained(tmp_path)
    _rewrite(
        tmp_path / WEIGHTS_NAME,
        lambda t: t["base_model.model.mlp.0.lora_B.weight"].view(-1).__setitem__(3, float("nan")),
    )
    target = make_model()
    with pytest.raises(ValueError, match="'base_model.model.mlp.0.lora_B.weight' holds non-finite values"):
        PeftModel.from_pretrained(target, tmp_path)
    _assert_untouched(target)


def test_bad_config_is_refused(tmp_path):
    _trained(tmp_path)
    (tmp_path / CONFIG_NAME).write_text('{"r": 4, "target_modules": ["mlp.0"], "fan_in_fan_out": true}')
    with pytest.raises(ValueError, match="fan_in_fan_out=True is not supported"):
        PeftModel.from_pretrained(make_model(), tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        PeftModel.from_pretrained(make_model(), tmp_path)


def test_failed_load_adapter_removes_the_new_adapter(tmp_path):
    _trained(tmp_path)
    _rewrite(tmp_path / WEIGHTS_NAME, lambda t: t.pop("base_model.model.dense.lora_A.weight"))
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0"], init_lora_weights=False))
    before = model(*make_batch())
    with pytest.raises(AdapterStateError, match=r"missing key dense\.lora_A\.weight"):
        model.load_adapter(tmp_path, "broken")
    assert model.adapter_names == ("default",)
    assert sorted(model.lora_layers()) == ["mlp.0"]
    assert torch.equal(model(*make_batch()), before)


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    model = _trained(tmp_path)
    previous = (tmp_path / WEIGHTS_NAME).read_bytes()
    train_steps(model, steps=1)

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr("recpeft.utils.integrity.save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path)
    assert (tmp_path / WEIGHTS_NAME).read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])


def test_classes_anywhere_in_the_config_are_saved_as_names(tmp_path):
    config = LoraConfig(
        r=2,
        target_modules=[nn.Linear, nn.Embedding],
        exclude_modules=[nn.EmbeddingBag],
        modules_to_save=[nn.Sequential],
        init_lora_weights=False,
    )
    with pytest.raises(ValueError, match="contains LoRA targets"):  # mlp holds LoRA targets
        get_peft_model(make_model(), config)
    config = LoraConfig(
        r=2,
        target_modules=[nn.Embedding],
        exclude_modules=[nn.EmbeddingBag],
        modules_to_save=[nn.Sequential],
        init_lora_weights=False,
    )
    model = get_peft_model(make_model(), config)
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert data["target_modules"] == ["item"] and data["exclude_modules"] is None and data["modules_to_save"] == ["mlp"]
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert torch.equal(loaded(*make_batch()), model(*make_batch()))
