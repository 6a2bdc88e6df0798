"""LoraConfig: validation with clear messages, HF PEFT JSON round trip."""

import json

import pytest
from torch import nn

from recpeft import LoraBias, LoraConfig


def test_json_round_trip_with_hf_key_names(tmp_path):
    config = LoraConfig(
        r=16,
        lora_alpha=32,
        lora_dropout=0.1,
        target_modules=["a", "b.c"],
        exclude_modules="x.*",
        rank_pattern={"b": 4},
        alpha_pattern={"a": 3},
        use_rslora=True,
        init_lora_weights="gaussian",
        bias="lora_only",
        modules_to_save=["head"],
    )
    path = config.save(tmp_path)
    data = json.loads(path.read_text())
    for key in (
        "r",
        "lora_alpha",
        "lora_dropout",
        "target_modules",
        "exclude_modules",
        "rank_pattern",
        "alpha_pattern",
        "use_rslora",
        "init_lora_weights",
        "bias",
        "modules_to_save",
        "peft_type",
    ):
        assert key in data
    assert data["bias"] == "lora_only"
    assert LoraConfig.load(tmp_path) == config


def test_reads_an_hf_peft_config_and_ignores_harmless_keys():
    hf = {
        "peft_type": "LORA",
        "r": 8,
        "lora_alpha": 16,
        "target_modules": ["q", "v"],
        "task_type": "FEATURE_EXTRACTION",
        "fan_in_fan_out": False,
        "revision": None,
        "use_dora": False,
        "layers_to_transform": None,
    }
    config = LoraConfig.from_dict(hf)
    assert config.r == 8 and config.target_modules == ["q", "v"] and config.bias is LoraBias.NONE


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(r=0), "r must be a positive integer"),
        (dict(lora_alpha=0), "lora_alpha must be positive"),
        (dict(lora_dropout=1.0), r"lora_dropout must be in \[0, 1\)"),
        (dict(bias="some"), "bias must be one of"),
        (dict(init_lora_weights="pissa"), "init_lora_weights must be one of"),
        (dict(target_modules=None), "target_modules is required"),
        (dict(target_modules="fc(("), "not a valid regex"),
        (dict(target_modules=[3]), "names or nn.Module classes"),
        (dict(rank_pattern={"fc": 0}), "rank_pattern"),
    ],
)
def test_invalid_values_are_named(kwargs, message):
    kwargs.setdefault("target_modules", ["fc"])
    with pytest.raises((ValueError, TypeError), match=message):
        LoraConfig(**kwargs)


def test_module_classes_must_be_resolved_before_json():
    with pytest.raises(ValueError, match="module classes"):
        LoraConfig(target_modules=[nn.Linear]).to_dict()


def test_patterns_match_the_end_of_the_name():
    config = LoraConfig(
        r=8, lora_alpha=8, target_modules=["fc"], rank_pattern={r"tower\.fc": 2}, alpha_pattern={"fc": 4}
    )
    assert config.rank_for("user.tower.fc") == 2
    assert config.rank_for("user.tower.fc2") == 8
    assert config.scale_for("user.tower.fc") == 2.0
    assert config.scale_for("item.fc") == 0.5
