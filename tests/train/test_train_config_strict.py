"""TrainConfig read from JSON: every field is checked for its JSON type and range, and the one-line
error names the field and the file the JSON came from."""

import json
import math

import pytest

from recpeft.train import TrainConfig


@pytest.mark.parametrize(
    "field, value",
    [
        ("amp", "false"),
        ("amp", 0),
        ("progress", "no"),
        ("keep_initial", 1),
        ("epochs", "3"),
        ("epochs", 3.0),
        ("epochs", None),
        ("epochs", True),
        ("batch_size", 0),
        ("seed", -1),
        ("lr", "0.01"),
        ("lr", None),
        ("lr", math.inf),
        ("lr", math.nan),
        ("weight_decay", -0.1),
        ("warmup_fraction", 1.5),
        ("min_lr_ratio", "0"),
        ("clip_grad_norm", math.inf),
        ("clip_grad_norm", "1"),
        ("early_stopping_patience", 0),
        ("early_stopping_patience", "2"),
        ("checkpoint_every_steps", 1.5),
        ("schedule", "linear"),
        ("schedule", 1),
        ("desc", 5),
        ("checkpoint_dir", 5),
        ("checkpoint_dir", ""),
    ],
)
def test_a_bad_field_is_one_line_naming_field_and_file(field, value):
    text = json.dumps({**TrainConfig().to_dict(), field: value})
    with pytest.raises(ValueError) as info:
        TrainConfig.from_json(text, source="ckpt/state.json")
    message = str(info.value)
    assert "\n" not in message and message.startswith("ckpt/state.json: ") and f"TrainConfig.{field}" in message
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_valid_json_round_trips():
    config = TrainConfig(epochs=2, lr=1e-3, clip_grad_norm=None, checkpoint_dir="ckpt", amp=False, desc="x")
    assert TrainConfig.from_json(config.to_json()) == config
