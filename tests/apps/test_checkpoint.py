"""Base checkpoints: a round trip rebuilds the same model and encoder; every broken file is an error
naming the file and the key, raised before anything is returned."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from recpeft.apps.base_checkpoint import load_base, save_base
from recpeft.datasets import ClickBatches, FeatureEncoder, Schema
from recpeft.models.dlrm import build_click_model
from recpeft.train import predict

SCHEMA = Schema(user="u", item="i", label="y", segment="s", timestamp="t", categorical=("c",), dense=("x",))


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "u": rng.integers(0, 30, 200),
            "i": rng.integers(0, 20, 200),
            "c": rng.choice(["a", "b"], 200),
            "x": rng.normal(size=200),
            "y": rng.integers(0, 2, 200).astype(float),
            "s": rng.choice(["p", "q"], 200),
            "t": pd.Timestamp("2025-01-01"),
        }
    )
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    torch.manual_seed(0)
    model = build_click_model(encoder.cardinalities, 1, embedding_dim=8, dense_arch=(8, 8), over_arch=(8,))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    save_base(tmp_path / "base", model, encoder)
    return tmp_path / "base", model, ClickBatches(encoder.transform(frame))


def test_round_trip(saved):
    path, model, rows = saved
    loaded, encoder = load_base(path)
    torch.testing.assert_close(predict(loaded, rows), predict(model, rows), rtol=0, atol=0)
    assert encoder.cardinalities == model.spec["cardinalities"]


def _edit_weights(path, edit):
    state = load_file(str(path / "model.safetensors"))
    edit(state)
    save_file(state, str(path / "model.safetensors"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop(next(k for k in s if "t_u" in k)), r"does not match model_config.json: missing key .*t_u"),
        (lambda s: s.update(extra=torch.zeros(1)), "does not match model_config.json: unexpected key extra"),
        (lambda s: s.update({k: torch.zeros(3, 8) for k in s if "t_i" in k}), "has shape"),
        (lambda s: s.update({k: torch.full_like(v, float("nan")) for k, v in s.items() if "t_c" in k}), "non-finite"),
    ],
)
def test_broken_weights_are_named(saved, edit, message):
    path = saved[0]
    _edit_weights(path, edit)
    with pytest.raises(ValueError, match=message) as info:
        load_base(path)
    assert "model.safetensors" in str(info.value)


def test_broken_config_and_encoder(saved):
    path = saved[0]
    (path / "model_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_config.json is not valid JSON"):
        load_base(path)
    (path / "model_config.json").write_text(json.dumps({"format": 99, "model": {}}))
    with pytest.raises(ValueError, match="not a recpeft base checkpoint"):
        load_base(path)
    (path / "encoder.json").unlink()
    with pytest.raises(FileNotFoundError, match="encoder.json is missing"):
        load_base(path)


def test_refuses_to_save_non_finite(saved, tmp_path):
    _, model, _ = saved
    with torch.no_grad():
        next(model.parameters()).fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite"):
        save_base(tmp_path / "other", model, FeatureEncoder())
    assert not (tmp_path / "other" / "model.safetensors").exists()
