"""The shared validators: what each accepts, what it refuses, and that the one-line message names
the argument, file or key at fault."""

import json
import math

import pytest
import torch

from recpeft.utils.validation import (
    check_fraction,
    check_int,
    check_positive_number,
    check_state_keys,
    check_state_shapes,
    first_non_finite,
    is_int,
    parse_json_object,
    read_json_object,
)


def test_bools_are_not_ints():
    assert is_int(3) and is_int(0) and is_int(-2)
    assert not is_int(True) and not is_int(False) and not is_int(2.0) and not is_int("2")


@pytest.mark.parametrize("value", [0, -1, True, 2.0, "3", None])
def test_check_int_refuses_non_positive_and_non_integers(value):
    with pytest.raises(ValueError, match=rf"^epochs must be a positive integer, got {value!r}$"):
        check_int("epochs", value)


def test_check_int_minimum():
    assert check_int("seed", 0, minimum=0) == 0
    assert check_int("n", 7) == 7
    with pytest.raises(ValueError, match="seed must be an integer ≥ 0, got -1"):
        check_int("seed", -1, minimum=0)
    with pytest.raises(ValueError, match="seed must be an integer ≥ 0, got False"):
        check_int("seed", False, minimum=0)


@pytest.mark.parametrize("value", [0, 0.0, -1e-9, math.nan, math.inf, -math.inf, True, "1e-3", None])
def test_check_positive_number_refuses(value):
    with pytest.raises(ValueError, match=r"^TrainConfig\.lr must be a positive finite number, got "):
        check_positive_number("TrainConfig.lr", value)


def test_check_positive_number_zero_only_with_allow_zero():
    assert check_positive_number("lr", 3) == 3.0 and isinstance(check_positive_number("lr", 3), float)
    assert check_positive_number("weight_decay", 0, allow_zero=True) == 0.0
    assert check_positive_number("weight_decay", 0.5, allow_zero=True) == 0.5
    for value in (-0.1, math.nan, math.inf, False):
        with pytest.raises(ValueError, match="weight_decay must be a finite number ≥ 0"):
            check_positive_number("weight_decay", value, allow_zero=True)


def test_check_fraction_bounds():
    assert check_fraction("warmup_fraction", 0) == 0.0
    assert check_fraction("warmup_fraction", 1) == 1.0
    assert check_fraction("lora_dropout", 0.999, below_one=True) == 0.999
    with pytest.raises(ValueError, match=r"lora_dropout must be in \[0, 1\), got 1.0"):
        check_fraction("lora_dropout", 1.0, below_one=True)
    for value in (-0.01, 1.01, math.nan, True, "0.5"):
        with pytest.raises(ValueError, match=r"warmup_fraction must be in \[0, 1\], got"):
            check_fraction("warmup_fraction", value)


def test_state_keys_name_the_first_missing_before_any_unexpected():
    check_state_keys({"a", "b"}, ["b", "a"], where="f.safetensors")
    with pytest.raises(KeyError, match="f.safetensors: missing key model.a"):
        check_state_keys(["c", "z"], ["b", "a", "c"], where="f.safetensors", prefix="model.", error=KeyError)
    with pytest.raises(ValueError, match="^f.safetensors: unexpected key y$"):
        check_state_keys(["a", "z", "y"], ["a"], where="f.safetensors")


def test_state_shapes_name_the_first_mismatch_in_the_expected_order():
    expected = {"b": torch.zeros(2, 3), "a": (4,), "gone": (1,)}
    check_state_shapes({"b": torch.ones(2, 3), "a": torch.ones(4), "extra": torch.ones(9)}, expected, where="ckpt")
    with pytest.raises(KeyError, match=r"ckpt: m\.b has shape \(3, 2\) but the model expects \(2, 3\)"):
        check_state_shapes(
            {"a": torch.ones(5), "b": torch.ones(3, 2)}, expected, where="ckpt", prefix="m.", error=KeyError
        )


def test_first_non_finite_names_the_tensor():
    good = {"w": torch.ones(3), "ids": torch.tensor([1, 2])}
    assert first_non_finite(good) is None
    assert first_non_finite({**good, "b": torch.tensor([0.0, math.inf]), "c": torch.tensor([math.nan])}) == "b"
    assert first_non_finite({"half": torch.tensor([math.nan], dtype=torch.float16)}) == "half"
    assert first_non_finite({}) is None


def test_parse_json_object(tmp_path):
    assert parse_json_object('{"a": 1}', "spec") == {"a": 1}
    with pytest.raises(ValueError, match="^spec must hold a JSON object$"):
        parse_json_object("[1, 2]", "spec")
    with pytest.raises(ValueError, match="^spec is not valid JSON: "):
        parse_json_object("{not json", "spec")


def test_read_json_object_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({"r": 4}))
    assert read_json_object(path) == {"r": 4}
    path.write_text('"just a string"')
    with pytest.raises(ValueError, match="adapter_config.json must hold a JSON object"):
        read_json_object(path)
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ValueError, match="adapter_config.json is not UTF-8 text"):
        read_json_object(path)
    path.write_text("{")
    with pytest.raises(ValueError, match="adapter_config.json is not valid JSON"):
        read_json_object(str(path))
