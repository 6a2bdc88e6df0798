"""Every command in README.md's "Your own data" section runs as written, in order, on a log with
the columns the section describes, and does what the section says; its TOML example is a config
file that `--config` takes."""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pandas as pd

from recpeft.apps.run_config import tomllib
from recpeft.cli import main

README = Path(__file__).resolve().parents[2] / "README.md"
#: the section's markets and their rows: PL is excluded by name, LU is under --min-segment-rows
MARKETS = {"DE": 1400, "FR": 1100, "PL": 800, "LU": 120}


def section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("## Your own data")
    return text[start : text.index("\n## ", start + 1)]


def blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", section(), flags=re.S)


def commands() -> list[list[str]]:
    """Each command line of the section's bash blocks, as argv (comments dropped)."""
    lines = [line for block in blocks("bash") for line in block.splitlines() if line.strip()]
    return [shlex.split(line, comments=True) for line in lines]


def write_logs(folder: Path) -> None:
    """log.parquet with the section's columns (a learnable taste per market) and new.parquet:
    later rows, without labels."""
    rng = np.random.default_rng(0)
    country = np.repeat(list(MARKETS), list(MARKETS.values()))
    n = len(country)
    item = rng.integers(0, 150, n)
    taste = np.sin(item % 9 + np.array([list(MARKETS).index(c) for c in country]))
    frame = pd.DataFrame(
        {
            "user": rng.integers(0, 400, n),
            "item": item,
            "label": (rng.random(n) < 1 / (1 + np.exp(1.2 - 1.5 * taste))).astype(int),
            "timestamp": pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 90 * 86400, n), "s"),
            "country": country,
            "category": [f"c{i % 9}" for i in item],
            "brand": [f"b{i % 13}" for i in item],
            "price": np.exp(rng.normal(2, 0.5, n)),
        }
    )
    frame.to_parquet(folder / "log.parquet")
    frame.sample(500, random_state=1).drop(columns=["label"]).to_parquet(folder / "new.parquet")


def test_the_section_lists_the_workflow():
    names = [argv[1] for argv in commands()]
    assert all(argv[0] == "recpeft" for argv in commands())
    assert {"pretrain", "finetune", "evaluate", "score", "merge"} <= set(names)
    assert names.index("pretrain") < names.index("finetune") < names.index("evaluate") < names.index("score")


def test_every_command_of_the_section_runs_as_written(tmp_path, monkeypatch, capsys):
    """In order, as written (plus --quiet: no progress bars in the test log)."""
    monkeypatch.chdir(tmp_path)
    write_logs(tmp_path)
    for block in blocks("toml"):  # a config the commands read: its first line names it
        name = block.splitlines()[0].removeprefix("#").strip()
        (tmp_path / name).write_text(block)
        tomllib.loads(block)
    for argv in commands():
        assert main([*argv[1:], "--quiet"]) == 0, (argv, capsys.readouterr().err)
    out = capsys.readouterr().out
    assert "left out of pretraining: LU (120 rows, under the minimum 500); PL (excluded by name)" in out
    assert "skipping: LU" in out
    base = tmp_path / "base"
    assert tomllib.loads((base / "run.toml").read_text())["exclude-segments"] == ["PL"]
    summary = json.loads((tmp_path / "adapters" / "summary.json").read_text())
    assert [r["segment"] for r in summary["segments"]] == ["DE", "FR", "PL"]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    adapters = {r["segment"]: r["adapter"] for r in evaluated["segments"]}
    assert adapters == {"DE": "DE", "FR": "FR", "LU": None, "PL": "PL"}
    scores = pd.read_parquet(tmp_path / "scores.parquet")
    assert list(scores.columns) == ["row", "user", "item", "country", "adapter", "score"] and len(scores) == 500
    assert ((scores["score"] > 0) & (scores["score"] < 1)).all()
    assert (tmp_path / "base-PL" / "model.safetensors").is_file()
    metrics = [json.loads((tmp_path / f / "model_config.json").read_text())["metrics"] for f in ("base", "base-again")]
    assert metrics[0] == metrics[1]  # "the same metrics, to the last digit"
    config = json.loads((tmp_path / "adapter-DE" / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["lora_alpha"] == 16
