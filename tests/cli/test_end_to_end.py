"""A team's week on the command line, end to end: pretrain without a new market (south, excluded
by name) and without a segment too small to learn from (isle, --min-segment-rows) → fine-tune
every segment by LoRA and dense in one command → evaluate every segment through its own adapter →
score new rows → merge the new market's adapter into a base of its own. Each step's output is
read back and checked against what the step before it wrote, or an independent path."""

import json

import pandas as pd
import pytest
import torch

from recpeft.apps.base_checkpoint import load_base
from recpeft.apps.run_config import tomllib
from recpeft.cli import main

from click_logs import ROLES, ROUTED_REL, merged_logits, write_log
from reference_math import assert_normwise_close


def _run(argv, capsys) -> str:
    assert main([*argv, "--quiet"]) == 0, capsys.readouterr().err
    return capsys.readouterr().out


def test_pretrain_finetune_evaluate_score_merge(tmp_path, capsys):
    log, base, adapters = tmp_path / "log.csv", tmp_path / "base", tmp_path / "adapters"
    frame = write_log(log, new_in_south=("uid",), isle_rows=20)
    tiny = ["--epochs", "2", "--embedding-dim", "8"]

    # 1. pretrain: south left out by name, isle for its size
    out = _run(["pretrain", str(log), *ROLES, *tiny, "--exclude-segments", "south", "--min-segment-rows", "50",
                "--output", str(base)], capsys)  # fmt: skip
    assert "left out of pretraining: isle (20 rows, under the minimum 50); south (excluded by name)" in out
    assert load_base(base)[1].segments == ["north"]
    assert tomllib.loads((base / "run.toml").read_text())["exclude-segments"] == ["south"]

    # 2. every segment the base can serve, both methods, one command; --no-keep-initial: the
    # checks below tell adapted scores from the base's, and this small log's validation rows
    # need not prefer a trained epoch to the base
    out = _run(["finetune", str(log), "--base", str(base), "--segments", "all", "--method", "lora,dense",
                "--epochs", "2", "--no-keep-initial", "--output", str(adapters)], capsys)  # fmt: skip
    assert "skipping: isle (20 rows, under the minimum 50)" in out
    summary = json.loads((adapters / "summary.json").read_text())
    lora = {r["segment"]: r for r in summary["segments"]}
    assert sorted(lora) == ["north", "south"] and lora["south"]["left_out_of_pretraining"] == "excluded by name"
    for segment in lora:
        assert (adapters / segment / "adapter_model.safetensors").is_file()
        assert (adapters / f"{segment}-dense" / "model.safetensors").is_file()

    # 3. evaluate, routed: each segment through its own adapter, isle through the base
    report = tmp_path / "eval.json"
    out = _run(["evaluate", str(log), "--base", str(base), "--adapters", str(adapters), "--json", str(report)], capsys)
    result = json.loads(report.read_text())
    rows = {r["segment"]: r for r in result["segments"]}
    assert {s: r["adapter"] for s, r in rows.items()} == {"isle": None, "north": "north", "south": "south"}
    assert rows["isle"]["adapted_log_loss"] == rows["isle"]["base_log_loss"]
    for segment in ("north", "south"):  # the routed pass scores what fine-tuning scored each adapter alone on
        assert rows[segment]["rows"] == lora[segment]["test_rows"]
        assert rows[segment]["adapted_log_loss"] == pytest.approx(lora[segment]["lora_log_loss"], abs=1e-5)
        assert rows[segment]["base_log_loss"] == pytest.approx(lora[segment]["base_log_loss"], abs=1e-5)
    weighted = result["impression_weighted"]
    assert weighted["rows"] == sum(r["rows"] for r in rows.values())
    assert min(r["adapted_auc"] for r in rows.values()) <= weighted["adapted_auc"]
    assert weighted["adapted_auc"] <= max(r["adapted_auc"] for r in rows.values())
    assert "base*" in out

    # 4. score new rows (no label), routed by segment: south, the new market, by its adapter
    new, scores = tmp_path / "new.parquet", tmp_path / "scores.parquet"
    latest = frame[frame["ts"] >= pd.Timestamp("2025-03-01")].drop(columns=["clicked", "ts"]).reset_index(drop=True)
    latest.to_parquet(new)
    _run(["score", str(new), "--base", str(base), "--adapters", str(adapters), "--chunk-rows", "128",
          "--output", str(scores)], capsys)  # fmt: skip
    scored = pd.read_parquet(scores)
    assert len(scored) == len(latest) and scored["row"].tolist() == list(range(len(latest)))
    assert scored["country"].tolist() == latest["country"].tolist()
    assert scored["adapter"].fillna("-").tolist() == latest["country"].replace("isle", "-").tolist()
    folders = {s: adapters / s for s in ("north", "south")}
    expected = torch.sigmoid(merged_logits(base, folders, latest))
    assert_normwise_close(torch.tensor(scored["score"].to_numpy()), expected, rel=ROUTED_REL)

    # 5. merge the new market's adapter: the merged base alone scores south's rows as routing did
    merged, alone = tmp_path / "base-south", tmp_path / "south.parquet"
    _run(["merge", "--base", str(base), "--adapter", str(adapters / "south"), "--output", str(merged)], capsys)
    _run(["score", str(new), "--base", str(merged), "--output", str(alone)], capsys)
    south = (latest["country"] == "south").to_numpy(copy=True)
    by_merged = torch.tensor(pd.read_parquet(alone)["score"].to_numpy()[south])
    assert_normwise_close(by_merged, torch.tensor(scored["score"].to_numpy()[south]), rel=ROUTED_REL)
    with pytest.raises(AssertionError, match="exceeds"):  # and not as the base did
        assert_normwise_close(
            by_merged, torch.sigmoid(merged_logits(base, {}, latest))[torch.from_numpy(south)], rel=ROUTED_REL
        )
