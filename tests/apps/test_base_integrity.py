"""Base checkpoints are saved as one set and verified on load: a writer killed at any point
leaves the old checkpoint or the new one (never new weights beside the old encoder), flipped
tensor bytes are refused naming the file, an edited config is checked against the weight file's
header before any table is allocated, files get the mode the umask gives."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pandas as pd
import pytest
import torch

import recpeft.apps.base_checkpoint as base_checkpoint
from recpeft.apps.base_checkpoint import CONFIG, ENCODER, WEIGHTS, load_base, save_base
from recpeft.datasets import FeatureEncoder, Schema
from recpeft.models.dlrm import build_click_model

from fault_injection import kill_rounds

SCHEMA = Schema(user="u", item="i", label="y", segment=None, timestamp=None, categorical=("c",), dense=("x",))


_REFS: dict = {}


def _load_ref(ref):
    if ref not in _REFS:
        model, encoder = load_base(ref)
        _REFS[ref] = model.state_dict(), encoder.to_json(), json.loads((ref / CONFIG).read_text())
    return _REFS[ref]


def _which(target, ref_a, ref_b):
    """Load ``target`` and say whether it is exactly version A or exactly version B."""
    model, encoder = load_base(target)
    assert sorted(p.name for p in target.iterdir()) == sorted([CONFIG, ENCODER, WEIGHTS]), "no debris after a load"
    state, config = model.state_dict(), json.loads((target / CONFIG).read_text())
    for name, ref in (("A", ref_a), ("B", ref_b)):
        ref_state, ref_encoder, ref_config = _load_ref(ref)
        if (
            state.keys() == ref_state.keys()
            and all(torch.equal(state[k], ref_state[k]) for k in state)
            and encoder.to_json() == ref_encoder
            and config == ref_config
        ):
            return name
    raise AssertionError("the folder holds a mix of versions A and B")


def test_killed_saves_leave_exactly_the_old_or_the_new_base(tmp_path):
    seen = kill_rounds("base", tmp_path, _which, rounds=40, max_delay=0.08, seed=1)
    assert sum(interrupted for _, interrupted in seen) >= 5


@pytest.fixture
def saved(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "u": np.arange(120) % 30,
            "i": rng.integers(0, 20, 120),
            "c": rng.choice(["a", "b"], 120),
            "x": rng.normal(size=120),
            "y": rng.integers(0, 2, 120).astype(float),
        }
    )
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    torch.manual_seed(0)
    model = build_click_model(encoder.cardinalities, 1, embedding_dim=8, dense_arch=(8, 8), over_arch=(8,))
    save_base(tmp_path / "base", model, encoder)
    return tmp_path / "base", model


@pytest.mark.parametrize("at", [0.0, 0.5, 1.0])
def test_flipped_tensor_byte_is_refused_naming_the_file(saved, at):
    path = saved[0] / WEIGHTS
    data = bytearray(path.read_bytes())
    start = 8 + struct.unpack("<Q", data[:8])[0]
    data[start + int(at * (len(data) - start - 1))] ^= 0x10
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{path} is corrupt: .*sha256") as info:
        load_base(saved[0])
    assert len(str(info.value).splitlines()) == 1


@pytest.mark.parametrize("rows", [5_000_000, 10**12])
def test_edited_cardinality_is_refused_before_allocating(saved, monkeypatch, rows):
    folder, model = saved
    table_rows = model.spec["cardinalities"]["u"]  # what the weight file holds
    config = json.loads((folder / CONFIG).read_text())
    config["model"]["cardinalities"]["u"] = rows
    (folder / CONFIG).write_text(json.dumps(config))
    devices = []
    real_build = base_checkpoint.build_click_model

    def spy(*args, **kwargs):
        devices.append(torch.empty(()).device.type)  # the device tensors are made on here
        return real_build(*args, **kwargs)

    monkeypatch.setattr(base_checkpoint, "build_click_model", spy)
    with pytest.raises(
        ValueError,
        match=rf"{folder / WEIGHTS} does not match {CONFIG}: field model.cardinalities.u = {rows} "
        rf".* has shape \({table_rows}, 8\)",
    ):
        load_base(folder)
    assert devices == ["meta"]  # no table was allocated for real


def test_edited_embedding_dim_is_refused_before_allocating(saved, monkeypatch):
    folder = saved[0]
    config = json.loads((folder / CONFIG).read_text())
    config["model"]["embedding_dim"], config["model"]["dense_arch"] = 4096, [8, 4096]
    (folder / CONFIG).write_text(json.dumps(config))
    devices = []
    real_build = base_checkpoint.build_click_model
    monkeypatch.setattr(
        base_checkpoint,
        "build_click_model",
        lambda *a, **k: devices.append(torch.empty(()).device.type) or real_build(*a, **k),
    )
    with pytest.raises(ValueError, match=rf"{WEIGHTS} does not match {CONFIG}: .*has shape"):
        load_base(folder)
    assert devices == ["meta"]


def test_saved_files_get_mode_0644_under_umask_022(tmp_path, saved):
    _, model = saved
    encoder = load_base(saved[0])[1]
    before = os.umask(0o022)
    try:
        save_base(tmp_path / "fresh", model, encoder)
    finally:
        os.umask(before)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / "fresh").iterdir()}
    assert modes == {WEIGHTS: oct(0o644), CONFIG: oct(0o644), ENCODER: oct(0o644)}
