"""``finetune --segments ... --joint`` (recpeft.apps.joint): every segment's adapter in one run
over the mixed rows, routed per row, with early stopping per segment."""

import json

import pandas as pd
import pytest
import torch

from recpeft.cli import main
from recpeft.utils.integrity import read_safetensors

from click_logs import ROLES, assert_initial_adapter, merged_logits, one_line_error, write_log


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("joint")
    log, base = root / "log.csv", root / "base"
    write_log(log, rows=3000)
    assert main(["pretrain", str(log), *ROLES, "--output", str(base), "--epochs", "1", "--embedding-dim", "8"]) == 0
    return {"root": root, "log": log, "base": base}


def _finetune(made, out, *extra):
    argv = ["finetune", str(made["log"]), *ROLES, "--base", str(made["base"]), "--segments", "all", "--joint"]
    assert main([*argv, "--epochs", "3", "--output", str(out), *extra]) == 0


def test_joint_training_saves_each_segments_adapter_and_scores_it(made, tmp_path, capsys):
    out = tmp_path / "adapters"
    _finetune(made, out, "--no-keep-initial", "--method", "lora,dense", "--lr", "0.02")
    assert "joint: 2 adapters in one run" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["joint"] is True
    rows = {r["segment"]: r for r in summary["segments"]}
    frame = pd.read_csv(made["log"])
    for segment in ("north", "south"):
        assert (out / f"{segment}-dense" / "model.safetensors").is_file()
        tensors = read_safetensors(out / segment / "adapter_model.safetensors")
        assert any(v.any() for k, v in tensors.items() if k.endswith("lora_B.weight") and "embedding" not in k)
        assert rows[segment]["lora_best_epoch"] >= 0 and rows[segment]["lora_history"]
        # the saved adapter alone, merged, scores its segment as the joint model's adapter did
        mine = merged_logits(made["base"], {segment: out / segment}, frame)
        assert not torch.equal(mine, merged_logits(made["base"], {}, frame))
    other = merged_logits(made["base"], {"north": out / "south"}, frame)
    assert not torch.equal(other, merged_logits(made["base"], {"north": out / "north"}, frame))


def test_per_segment_stopping_keeps_the_base_where_no_epoch_beats_it(made, tmp_path):
    out = tmp_path / "adapters"
    _finetune(made, out, "--min-improvement", "1.0")  # AUC cannot gain 1: every segment keeps the base
    for segment in ("north", "south"):
        assert_initial_adapter(out / segment)
    rows = {r["segment"]: r for r in json.loads((out / "summary.json").read_text())["segments"]}
    assert rows["north"]["lora_best_epoch"] == rows["south"]["lora_best_epoch"] == -1


def test_joint_needs_segments_and_fixed_targets(made, tmp_path, capsys):
    argv = ["finetune", str(made["log"]), *ROLES, "--base", str(made["base"]), "--output", str(tmp_path / "a")]
    one_line_error([*argv, "--segment", "north", "--joint"], capsys, "--joint", "--segments")
    one_line_error([*argv, "--segments", "all", "--joint", "--target-modules", "auto"], capsys, "--joint", "auto")
