"""The `recpeft` command end to end: the demo's report and targets, pretrain → finetune → evaluate →
merge on a user's CSV and on a MovieLens folder (files written here), and one-line errors."""

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft.apps.base_checkpoint import load_base
from recpeft.cli import main
from recpeft.datasets import ClickBatches
from recpeft.peft.model import PeftModel
from recpeft.train import predict

from reference_math import assert_normwise_close


def test_demo_end_to_end(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--quiet"]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert [m["market"] for m in report["markets"]] == ["DE", "ES", "FR", "NL"]
    assert report["routing_max_abs_diff"] < 1e-4
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in report["markets"]:
        assert (tmp_path / "adapters" / row["market"] / "adapter_model.safetensors").is_file()
        for key in ("base_auc", "lora_auc", "dense_auc"):
            assert 0.5 < row[key] < 1.0
        assert row["lora_trainable_params"] < row["dense_trainable_params"] / 10
    # the report's own target checks agree with its numbers
    checks = report["checks"]
    lora_vs_dense = all(r["lora_auc"] - r["dense_auc"] >= -0.002 for r in report["markets"])
    assert checks["LoRA AUC ≥ dense − 0.002 in every market"] == lora_vs_dense
    out = capsys.readouterr().out
    assert "routed a mixed batch" in out and "target" in out
    # a second run reuses the saved base and gives the same base scores
    assert main(["demo", "--out", str(tmp_path), "--quiet", "--markets", "ES"]) == 1  # refused: it holds a run
    assert main(["demo", "--out", str(tmp_path), "--quiet", "--markets", "ES", "--overwrite"]) == 0
    again = json.loads((tmp_path / "report.json").read_text())
    assert again["base"]["reused"] and again["markets"][0]["base_auc"] == report["markets"][1]["base_auc"]


def _interaction_log(path, seed=0, rows=6000):
    """A small click log with a learnable signal: segment-specific liking of categories."""
    rng = np.random.default_rng(seed)
    segment = rng.choice(["north", "south"], rows, p=[0.7, 0.3])
    user, item = rng.integers(0, 300, rows), rng.integers(0, 200, rows)
    category = item % 7
    price = np.exp(rng.normal(2, 0.5, rows))
    taste = np.where(segment == "north", np.sin(category), np.cos(3 * category))
    label = (rng.random(rows) < 1 / (1 + np.exp(-(2 * taste - 1.5)))).astype(int)
    frame = pd.DataFrame(
        {
            "uid": user,
            "sku": item,
            "cat": [f"c{c}" for c in category],
            "price": price,
            "clicked": label,
            "country": segment,
            "ts": pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 90 * 86400, rows), "s"),
        }
    )
    frame.to_csv(path, index=False)
    return frame


def test_pretrain_finetune_evaluate_merge_on_a_csv(tmp_path, capsys):
    log = tmp_path / "log.csv"
    _interaction_log(log)
    roles = [
        "--user",
        "uid",
        "--item",
        "sku",
        "--label",
        "clicked",
        "--segment-col",
        "country",
        "--timestamp",
        "ts",
        "--categorical",
        "cat",
        "--dense",
        "price",
        "--quiet",
    ]
    base, adapter, merged = tmp_path / "base", tmp_path / "adapters" / "south", tmp_path / "merged"
    assert main(["pretrain", str(log), *roles, "--out", str(base), "--epochs", "2", "--embedding-dim", "16"]) == 0
    assert (
        main(
            [
                "finetune",
                str(log),
                *roles,
                "--base",
                str(base),
                "--segment",
                "south",
                "--out",
                str(adapter),
                "--epochs",
                "3",
            ]
        )
        == 0
    )
    assert "test AUC base" in capsys.readouterr().out
    assert (
        main(
            [
                "evaluate",
                str(log),
                *roles,
                "--base",
                str(base),
                "--adapter",
                str(adapter),
                "--json",
                str(tmp_path / "eval.json"),
            ]
        )
        == 0
    )
    scores = json.loads((tmp_path / "eval.json").read_text())["segments"]
    assert {s["segment"] for s in scores} == {"north", "south"}
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(merged), "--quiet"]) == 0

    # the merged checkpoint scores exactly what the base with the adapter scores
    model, encoder = load_base(base)
    adapted = PeftModel.from_pretrained(model, adapter)
    folded, _ = load_base(merged)
    frame = pd.read_csv(log).tail(500)
    from recpeft.datasets import Schema, load_interactions

    schema = Schema(
        user="uid",
        item="sku",
        label="clicked",
        segment="country",
        timestamp="ts",
        categorical=("cat",),
        dense=("price",),
    )
    rows = ClickBatches(encoder.transform(load_interactions(frame, schema), unseen="oov"))
    assert_normwise_close(predict(folded, rows), predict(adapted, rows), name="folded")  # reference_math: merged sums
    assert not torch.allclose(predict(folded, rows), predict(load_base(base)[0], rows))


def _movielens_1m(folder, seed=0, users=60, items=40, ratings=2500):
    """An ML-1M folder: ratings.dat, users.dat, movies.dat in the `::` format."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    gender = {u: str(rng.choice(["M", "F"])) for u in range(1, users + 1)}
    user, item = rng.integers(1, users + 1, ratings), rng.integers(1, items + 1, ratings)
    liking = np.array([1.0 if (gender[u] == "F") == (i % 2 == 0) else -1.0 for u, i in zip(user, item)])
    rating = np.clip(np.round(3 + 1.5 * liking + rng.normal(0, 0.8, ratings)), 1, 5).astype(int)
    stamp = rng.integers(956_703_932, 1_046_454_590, ratings)
    (folder / "ratings.dat").write_text(
        "".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in zip(user, item, rating, stamp))
    )
    (folder / "users.dat").write_text("".join(f"{u}::{g}::25::4::{10000 + u}\n" for u, g in gender.items()))
    genres = ["Comedy", "Drama", "Action|Thriller"]
    (folder / "movies.dat").write_bytes(
        "".join(f"{i}::Film {i} (1995)::{genres[i % 3]}\n" for i in range(1, items + 1)).encode("latin-1")
    )


def test_movielens_folder_through_finetune(tmp_path, capsys):
    data = tmp_path / "ml-1m"
    _movielens_1m(data)
    base, adapter = tmp_path / "base", tmp_path / "adapters" / "F"
    assert main(["pretrain", str(data), "--out", str(base), "--epochs", "2", "--embedding-dim", "8", "--quiet"]) == 0
    assert (
        main(
            [
                "finetune",
                str(data),
                "--base",
                str(base),
                "--segment",
                "F",
                "--segment-by",
                "gender",
                "--out",
                str(adapter),
                "--epochs",
                "2",
                "--quiet",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "F: " in out and (adapter / "adapter_model.safetensors").is_file()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert any("t_genre" in t for t in config["target_modules"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["finetune", "--base", "{tmp}/missing", "--segment", "DE", "--out", "{tmp}/a"],
            "model.safetensors is missing",
        ),
        (["pretrain", "{tmp}/none.csv", "--out", "{tmp}/b"], "no such file"),
        (["evaluate", "--base", "{tmp}/missing"], "is not a base checkpoint"),
    ],
)
def test_errors_are_one_line(tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "recpeft.cli", *argv, "--quiet"], capture_output=True, text=True)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.startswith(f"recpeft {argv[0]}: error:")
    assert message in result.stderr and result.stderr.count("\n") == 1


def test_demo_output_folder_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "recpeft.cli", "demo", "--quiet", "--out", str(blocker / "out")],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and result.stderr.startswith("recpeft demo: error:")


def _other_log(path, seed, segments, shift=0):
    frame = _interaction_log(path, seed=seed)
    frame["country"] = np.where(frame["country"] == "north", segments[0], segments[1])
    frame["uid"] += shift
    frame["sku"] += shift
    frame.to_csv(path, index=False)


def test_new_segment_unseen_ids_and_a_foreign_base(tmp_path, capsys):
    """A segment the base never saw fine-tunes (the roles come from the base); data whose ids the
    base mostly never saw is refused; an adapter does not apply to another base."""
    log, new, alien = tmp_path / "log.csv", tmp_path / "new.csv", tmp_path / "alien.csv"
    _interaction_log(log)
    _other_log(new, seed=1, segments=("east", "west"))
    _other_log(alien, seed=2, segments=("east", "west"), shift=10_000)
    roles = [
        "--user",
        "uid",
        "--item",
        "sku",
        "--label",
        "clicked",
        "--segment-col",
        "country",
        "--timestamp",
        "ts",
        "--categorical",
        "cat",
        "--dense",
        "price",
    ]
    base, other = tmp_path / "base", tmp_path / "other"
    for out, seed in ((base, "0"), (other, "1")):
        assert (
            main(
                [
                    "pretrain",
                    str(log),
                    *roles,
                    "--out",
                    str(out),
                    "--epochs",
                    "1",
                    "--embedding-dim",
                    "8",
                    "--seed",
                    seed,
                    "--quiet",
                ]
            )
            == 0
        )
    adapter = tmp_path / "adapters" / "east"
    # no role flags: the base's encoder.json names the columns
    assert (
        main(
            [
                "finetune",
                str(new),
                "--base",
                str(base),
                "--segment",
                "east",
                "--out",
                str(adapter),
                "--epochs",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    assert "east: " in capsys.readouterr().out
    assert (
        main(
            ["finetune", str(alien), "--base", str(base), "--segment", "east", "--out", str(tmp_path / "x"), "--quiet"]
        )
        == 1
    )
    assert "unknown to the base" in capsys.readouterr().err
    assert main(["evaluate", str(new), "--base", str(other), "--adapter", str(adapter), "--quiet"]) == 1
    assert "trained on another base" in capsys.readouterr().err
    assert (
        main(
            [
                "merge",
                "--base",
                str(other),
                "--adapter",
                str(adapter),
                "--out",
                str(tmp_path / "m"),
                "--ignore-base-mismatch",
                "--quiet",
            ]
        )
        == 0
    )
