"""The training flags of pretrain and finetune beyond the basics: ``--stop-metric`` (auc or logloss),
``--min-improvement`` and ``--keep-initial`` (on by default for finetune: the base competes as
epoch −1 and is kept unless an epoch beats it on the segment's validation rows)."""

import json
import math

import pandas as pd

from recpeft.apps.run_config import tomllib
from recpeft.cli import main

from click_logs import ROLES, assert_initial_adapter, merged_logits, one_line_error, write_log


def _pretrain(root, *extra):
    log, base = root / "log.csv", root / "base"
    write_log(log)
    argv = ["pretrain", str(log), *ROLES, "--output", str(base), "--epochs", "2", "--embedding-dim", "8", *extra]
    assert main(argv) == 0
    return log, base


def test_pretrain_stopping_on_logloss_still_records_the_kept_epochs_auc(tmp_path):
    _, base = _pretrain(tmp_path, "--stop-metric", "logloss")
    metrics = json.loads((base / "model_config.json").read_text())["metrics"]
    assert 0.0 < metrics["valid_auc"] < 1.0 and 0.0 < metrics["valid_logloss"] < 5.0
    assert metrics["valid_auc"] != metrics["valid_logloss"]  # not the stopping metric under the AUC's name
    written = tomllib.loads((base / "run.toml").read_text())
    assert written["stop-metric"] == "logloss" and written["keep-initial"] is False


def test_finetune_keeps_the_base_when_no_epoch_beats_it_by_the_minimum(tmp_path, capsys):
    log, base = _pretrain(tmp_path)
    adapter = tmp_path / "adapter"
    finetune = ["finetune", str(log), *ROLES, "--base", str(base), "--segment", "south", "--epochs", "2"]
    # AUC lies in [0, 1]: no epoch can beat the base by more than 1
    assert main([*finetune, "--min-improvement", "1.0", "--output", str(adapter)]) == 0
    assert "kept the base" in capsys.readouterr().out
    written = tomllib.loads((adapter / "run.toml").read_text())
    assert written["keep-initial"] is True and written["min-improvement"] == 1.0 and written["stop-metric"] == "auc"
    assert_initial_adapter(adapter)


def test_finetune_without_keep_initial_keeps_a_trained_epoch(tmp_path, capsys):
    log, base = _pretrain(tmp_path)
    adapter = tmp_path / "adapter"
    finetune = ["finetune", str(log), *ROLES, "--base", str(base), "--segment", "south", "--epochs", "2"]
    argv = [*finetune, "--no-keep-initial", "--stop-metric", "logloss", "--output", str(adapter)]
    assert main([*argv, "--min-improvement", "1.0", "--lr", "0.05"]) == 0
    assert "kept epoch 0" in capsys.readouterr().out  # nothing improves on epoch 0 by more than 1
    frame = pd.read_csv(log)
    changed = merged_logits(base, {"south": adapter}, frame) - merged_logits(base, {}, frame)
    assert math.isfinite(float(changed.abs().max())) and float(changed.abs().max()) > 0
    assert tomllib.loads((adapter / "run.toml").read_text())["keep-initial"] is False


def test_bad_training_flags_are_one_line_errors(tmp_path, capsys):
    log = tmp_path / "log.csv"
    write_log(log)
    argv = ["pretrain", str(log), *ROLES, "--output", str(tmp_path / "base")]
    one_line_error([*argv, "--min-improvement", "-0.1"], capsys, "min_improvement")
    assert not (tmp_path / "base").exists()
