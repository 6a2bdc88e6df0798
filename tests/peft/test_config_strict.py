"""LoraConfig fields are checked for their JSON type and range, not just their presence: a string
is not a boolean, ``null`` and ``"8"`` are not numbers, and every error is one line naming the
field and the file."""

import json
import math

import pytest

from recpeft import LoraConfig, PeftModel, get_peft_model

from toy_models import ALL_TARGETS, make_model

VALID = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["mlp.0"]}


def _write(tmp_path, **overrides):
    data = {**VALID, **overrides}
    # json.dumps writes inf / nan as the tokens Python's json reads back (Infinity, NaN)
    (tmp_path / "adapter_config.json").write_text(json.dumps(data))
    return tmp_path / "adapter_config.json"


@pytest.mark.parametrize(
    "field, value",
    [
        ("use_rslora", "no"),
        ("use_rslora", "false"),
        ("use_rslora", 1),
        ("inference_mode", "false"),
        ("inference_mode", 0),
        ("lora_alpha", "8"),
        ("lora_alpha", None),
        ("lora_alpha", math.inf),
        ("lora_alpha", math.nan),
        ("lora_alpha", -2),
        ("lora_alpha", True),
        ("r", "4"),
        ("r", 4.0),
        ("r", None),
        ("r", True),
        ("lora_dropout", "0.1"),
        ("lora_dropout", None),
        ("init_lora_weights", 1),
        ("init_lora_weights", "true"),
        ("alpha_pattern", {"mlp": 0}),
        ("alpha_pattern", {"mlp": -1.5}),
        ("alpha_pattern", {"mlp": "16"}),
        ("alpha_pattern", {"mlp": math.inf}),
        ("alpha_pattern", ["mlp"]),
        ("rank_pattern", {"mlp": "2"}),
        ("rank_pattern", {"mlp": 2.5}),
        ("rank_pattern", "mlp"),
        ("task_type", 5),
        ("base_model_name_or_path", ["x"]),
        ("modules_to_save", 3),
        ("modules_to_save", [3]),
        ("adapted_modules", {"mlp.0": {"r": "4", "lora_alpha": 8}}),
        ("adapted_modules", {"mlp.0": {"r": 4, "lora_alpha": 0}}),
        ("adapted_modules", {"mlp.0": {"r": 4}}),
        ("adapted_modules", {}),
        ("adapted_modules", ["mlp.0"]),
    ],
)
def test_a_wrongly_typed_field_is_one_line_naming_field_and_file(tmp_path, field, value):
    path = _write(tmp_path, **{field: value})
    with pytest.raises(ValueError) as info:
        LoraConfig.load(tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ") and field in message
    with pytest.raises(ValueError, match=field):  # the same check in Python, without a file
        LoraConfig(**{**VALID, field: value})


def test_the_string_false_no_longer_acts_as_true(tmp_path):
    """Before: ``"inference_mode": "false"`` froze the adapter and ``"use_rslora": "no"`` changed
    its scale to α/√r. Real booleans still work and give the documented scales."""
    _write(tmp_path, use_rslora=True, inference_mode=False)
    config = LoraConfig.load(tmp_path)
    assert config.use_rslora is True and config.scale_for("mlp.0") == 8 / math.sqrt(4)
    assert LoraConfig(**VALID).scale_for("mlp.0") == 8 / 4
    for field in ("use_rslora", "inference_mode"):
        _write(tmp_path, **{field: "false"})
        with pytest.raises(ValueError, match=f"{field} must be true or false"):
            LoraConfig.load(tmp_path)


def test_a_bad_field_is_refused_before_the_model_is_touched(tmp_path):
    model = get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0"], init_lora_weights=False))
    model.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**data, "lora_alpha": None}))
    fresh = make_model()
    with pytest.raises(ValueError, match=r"adapter_config\.json: lora_alpha must be positive and finite"):
        PeftModel.from_pretrained(fresh, tmp_path)
    assert not any(n.startswith("mlp.0.") and "lora" in n for n, _ in fresh.named_parameters())


def test_valid_numbers_of_either_json_type_are_kept():
    config = LoraConfig(r=2, lora_alpha=3.5, target_modules=["fc"], alpha_pattern={"fc": 7}, rank_pattern={"f.": 1})
    assert config.rank_for("tower.fc") == 1 and config.alpha_for("tower.fc") == 7
    assert config.scale_for("tower.fc") == 7 / 1 and config.scale_for("other") == 3.5 / 2
    assert LoraConfig(target_modules=["fc"], init_lora_weights="gaussian").init_lora_weights == "gaussian"


def _saved(tmp_path, **config):
    model = get_peft_model(make_model(), LoraConfig(r=4, target_modules=ALL_TARGETS, **config))
    model.save_pretrained(tmp_path)
    return json.loads((tmp_path / "adapter_config.json").read_text())


@pytest.mark.parametrize("where", ["adapted_modules", "r"])
def test_a_huge_rank_is_refused_before_anything_is_allocated(tmp_path, where):
    """r = 10^12 on a 16-wide layer would ask for 64 TB: refused from the file's shapes instead."""
    saved = _saved(tmp_path)
    if where == "r":  # a file without adapted_modules (as HF PEFT writes) uses r itself
        del saved["adapted_modules"]
        saved["r"] = 10**12
    else:
        saved["adapted_modules"]["mlp.0"]["r"] = 10**12
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    base = make_model()
    with pytest.raises(ValueError, match=r"adapter_config\.json: .*r = 1000000000000 is larger than every dimension"):
        PeftModel.from_pretrained(base, tmp_path)
    with pytest.raises(ValueError, match="is larger than every dimension"):
        get_peft_model(make_model(), LoraConfig(r=2, target_modules=["mlp.0"])).load_adapter(tmp_path, "other")


def test_the_rank_check_passes_every_rank_a_saved_file_uses(tmp_path):
    _saved(tmp_path, rank_pattern={"mlp.0": 7})
    loaded = PeftModel.from_pretrained(make_model(), tmp_path)
    assert loaded.base_model.mlp[0].ranks["default"] == 7
