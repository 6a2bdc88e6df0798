"""Many adapters at once from the command line: ``evaluate --adapters DIR`` scores every segment
through its own adapter in one routed pass (beside the base, with the impression-weighted row),
and ``score`` writes predictions for new rows, routed by segment and streamed in chunks. Both are
checked against an independent path: each segment's adapter merged into the base."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft.cli import main
from recpeft.metrics import auc, log_loss

from click_logs import ROLES, ROUTED_REL, merged_logits, metric_slacks, one_line_error, write_log
from reference_math import assert_normwise_close

CUT = "2025-03-10"


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A log (north, south, and a 20-row isle), a base split at CUT without isle, and every
    segment but isle fine-tuned by LoRA and dense (DIR/<segment>, DIR/<segment>-dense)."""
    root = tmp_path_factory.mktemp("routed")
    log, base, adapters = root / "log.csv", root / "base", root / "adapters"
    frame = write_log(log, isle_rows=20)
    pretrain = ["pretrain", str(log), *ROLES, "--epochs", "1", "--embedding-dim", "8", "--test-start", CUT]
    assert main([*pretrain, "--min-segment-rows", "50", "--output", str(base)]) == 0
    finetune = ["finetune", str(log), *ROLES, "--base", str(base), "--epochs", "2", "--no-keep-initial"]
    finetune += ["--output", str(adapters)]  # --no-keep-initial: adapters that move off the base
    assert main([*finetune, "--segments", "all", "--method", "lora,dense"]) == 0
    new = frame.drop(columns=["clicked", "ts"])  # rows to score: no label, no time
    new.to_csv(root / "new.csv", index=False)
    new.to_parquet(root / "new.parquet")
    folders = {s: adapters / s for s in ("north", "south")}
    return {"root": root, "log": log, "base": base, "adapters": adapters, "frame": frame, "folders": folders}


def test_evaluate_adapters_routes_every_segment_to_its_own(made, capsys, tmp_path):
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--adapters", str(made["adapters"])]
    assert main([*argv, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "dense copies (base checkpoints, not adapters; not routed): north, south" in out
    result = json.loads(report.read_text())
    assert result["routing"] == {s: str(f) for s, f in made["folders"].items()}
    rows = {row["segment"]: row for row in result["segments"]}
    assert sorted(rows) == ["isle", "north", "south"]
    test = made["frame"][made["frame"]["ts"] >= pd.Timestamp(CUT)].reset_index(drop=True)
    routed = merged_logits(made["base"], made["folders"], test)
    alone = merged_logits(made["base"], {}, test)
    for segment, row in rows.items():
        mask = torch.from_numpy((test["country"] == segment).to_numpy(copy=True))
        labels = torch.tensor(test["clicked"].to_numpy()[mask.numpy()], dtype=torch.float32)
        assert row["rows"] == int(mask.sum()) and row["adapter"] == (None if segment == "isle" else segment)
        for arm, logits in (("adapted", routed[mask]), ("base", alone[mask])):
            auc_slack, loss_slack = metric_slacks(logits, labels)
            assert abs(row[f"{arm}_auc"] - auc(logits, labels)) <= auc_slack, (segment, arm)
            assert abs(row[f"{arm}_log_loss"] - log_loss(logits, labels)) <= loss_slack, (segment, arm)
    # a segment without an adapter is the base's (the same rows, batched in adapter order: equal
    # to float32 rounding of the base's own ops), and marked so
    isle = torch.from_numpy((test["country"] == "isle").to_numpy(copy=True))
    isle_labels = torch.tensor(test["clicked"].to_numpy()[isle.numpy()], dtype=torch.float32)
    _, loss_slack = metric_slacks(alone[isle], isle_labels)
    assert abs(rows["isle"]["adapted_log_loss"] - rows["isle"]["base_log_loss"]) <= loss_slack
    assert "base*" in out.split("isle", 2)[-1].splitlines()[0]
    for segment in ("north", "south"):  # the adapters matter
        assert rows[segment]["adapted_log_loss"] != rows[segment]["base_log_loss"]
    weighted = result["impression_weighted"]
    total = sum(r["rows"] for r in rows.values())
    for key in ("base_auc", "adapted_auc", "base_log_loss", "adapted_log_loss"):
        expected = sum(r["rows"] * r[key] for r in rows.values()) / total
        assert weighted[key] == pytest.approx(expected, rel=1e-12), key
    assert weighted["rows"] == total
    # the summary finetune wrote scored each LoRA adapter alone on the same rows
    summary = {r["segment"]: r for r in json.loads((made["adapters"] / "summary.json").read_text())["segments"]}
    for segment in ("north", "south"):
        assert rows[segment]["adapted_log_loss"] == pytest.approx(summary[segment]["lora_log_loss"], abs=1e-5)


def test_evaluate_adapters_refuses_what_is_not_a_folder_of_adapters(made, capsys, tmp_path):
    argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--adapters"]
    one_line_error([*argv, str(made["folders"]["south"])], capsys, "is one adapter folder", "--adapter")
    (tmp_path / "empty").mkdir()
    one_line_error([*argv, str(tmp_path / "empty")], capsys, "holds no adapter folder")
    foreign = tmp_path / "foreign"
    shutil.copytree(made["folders"]["south"], foreign / "south")
    record = foreign / "south" / "recpeft_base.json"
    record.write_text(json.dumps({"base": "elsewhere", "sha256": "0" * 64}))
    one_line_error(
        [*argv, str(foreign)], capsys, "adapter 'south'", "trained on another base", "--ignore-base-mismatch"
    )
    assert main([*argv, str(foreign), "--ignore-base-mismatch"]) == 0


def _scores(path) -> pd.DataFrame:
    return pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=False)


def test_score_routes_new_rows_by_segment_in_chunks(made, capsys):
    root, frame = made["root"], made["frame"]
    parquet, csv = root / "scores.parquet", root / "scores.csv"
    argv = ["score", "--base", str(made["base"]), "--adapters", str(made["adapters"])]
    assert main([*argv, str(root / "new.csv"), "--output", str(parquet), "--chunk-rows", "300"]) == 0
    assert "rows per adapter: base 20; north" in capsys.readouterr().out
    scores = _scores(parquet)
    assert list(scores.columns) == ["row", "uid", "sku", "country", "adapter", "score"]
    assert scores["row"].tolist() == list(range(len(frame)))
    for column in ("uid", "sku", "country"):
        assert scores[column].tolist() == frame[column].tolist(), column
    expected = frame["country"].where(frame["country"] != "isle")
    assert scores["adapter"].isna().tolist() == expected.isna().tolist()
    assert scores["adapter"].dropna().tolist() == expected.dropna().tolist()
    reference = torch.sigmoid(merged_logits(made["base"], made["folders"], frame))
    assert_normwise_close(torch.tensor(scores["score"].to_numpy()), reference, rel=ROUTED_REL)
    # the same from Parquet in one chunk, written as CSV (by the suffix)
    assert main([*argv, str(root / "new.parquet"), "--output", str(csv), "--quiet"]) == 0
    again = _scores(csv)
    assert again["row"].tolist() == scores["row"].tolist() and again["country"].tolist() == frame["country"].tolist()
    assert again["adapter"].replace("", None).isna().sum() == 20
    assert_normwise_close(torch.tensor(again["score"].to_numpy()), reference, rel=ROUTED_REL)
    assert (root / "scores.parquet.run.toml").is_file() and (root / "scores.csv.run.toml").is_file()


def test_score_with_one_adapter_or_none(made, tmp_path):
    argv = ["score", str(made["root"] / "new.parquet"), "--base", str(made["base"]), "--quiet"]
    assert main([*argv, "--adapter", str(made["folders"]["south"]), "--output", str(tmp_path / "s.parquet")]) == 0
    scores = _scores(tmp_path / "s.parquet")
    assert set(scores["adapter"]) == {"south"}  # every row, whatever its segment
    frame = made["frame"].assign(country="south")
    reference = torch.sigmoid(merged_logits(made["base"], {"south": made["folders"]["south"]}, frame))
    assert_normwise_close(torch.tensor(scores["score"].to_numpy()), reference, rel=ROUTED_REL)
    unsegmented = tmp_path / "plain.csv"
    made["frame"].drop(columns=["country"]).to_csv(unsegmented, index=False)  # the base alone needs no segment
    argv = ["score", str(unsegmented), "--base", str(made["base"]), "--quiet", "--output", str(tmp_path / "b.csv")]
    assert main(argv) == 0
    alone = _scores(tmp_path / "b.csv")
    assert list(alone.columns) == ["row", "uid", "sku", "adapter", "score"] and (alone["adapter"] == "").all()
    reference = torch.sigmoid(merged_logits(made["base"], {}, made["frame"]))
    assert_normwise_close(torch.tensor(alone["score"].to_numpy()), reference, rel=ROUTED_REL)


def test_score_refuses_to_overwrite_or_write_into_its_input(made, capsys, tmp_path):
    data = made["root"] / "new.csv"
    before = data.read_bytes()
    argv = ["score", str(data), "--base", str(made["base"]), "--quiet"]
    out = tmp_path / "s.csv"
    assert main([*argv, "--output", str(out)]) == 0
    first = out.read_bytes()
    one_line_error([*argv, "--output", str(out)], capsys, "--output", "already exists; pass --overwrite")
    assert main([*argv, "--output", str(out), "--overwrite", "--adapters", str(made["adapters"])]) == 0
    assert out.read_bytes() != first
    one_line_error([*argv, "--output", str(data), "--overwrite"], capsys, "which this command reads")
    one_line_error([*argv, "--output", str(made["base"] / "s.csv")], capsys, "is inside")
    one_line_error([*argv, "--output", str(tmp_path / "s.txt")], capsys, "name a .parquet (or .pq) or .csv file")
    assert data.read_bytes() == before


def test_a_bad_row_late_in_the_file_leaves_no_output(made, capsys, tmp_path):
    frame = made["frame"].drop(columns=["clicked", "ts"]).astype({"price": object})
    frame.loc[1234, "price"] = "n/a"
    data, out = tmp_path / "bad.csv", tmp_path / "out" / "s.parquet"
    frame.to_csv(data, index=False)
    argv = ["score", str(data), "--base", str(made["base"]), "--chunk-rows", "500", "--output", str(out), "--quiet"]
    one_line_error(argv, capsys, f"{data}: column 'price', index 1234")
    assert not out.parent.exists() or not any(out.parent.iterdir())  # nothing written, no temporary left
    nothing = tmp_path / "nothing.csv"
    one_line_error(
        ["score", str(nothing), "--base", str(made["base"]), "--output", str(tmp_path / "y.csv")], capsys, str(nothing)
    )
    missing = tmp_path / "nosku.csv"
    made["frame"].drop(columns=["sku"]).to_csv(missing, index=False)
    argv = ["score", str(missing), "--base", str(made["base"]), "--output", str(tmp_path / "z.csv")]
    one_line_error(argv, capsys, "missing column(s) ['sku']")


def test_score_shows_a_bar_over_rows(made, capsys, tmp_path):
    argv = ["score", str(made["root"] / "new.csv"), "--base", str(made["base"]), "--chunk-rows", "400"]
    assert main([*argv, "--output", str(tmp_path / "s.csv")]) == 0
    err = capsys.readouterr().err
    rows = len(made["frame"])
    assert f"{rows}/{rows}" in err and "rows/s" in err, err[-400:]
    assert np.isfinite(_scores(tmp_path / "s.csv")["score"]).all()
