"""A base remembers how its data was read and split (data_source.json): `finetune` and `evaluate`
without the flags read the same segments and hold out the same test rows, a flag given with
another value is refused naming it and both values, `merge` and `finetune --method dense` carry
the record into the base they write, and a base without a record works as before."""

import json

import numpy as np
import pandas as pd
import pytest

from recpeft.cli import main

from click_logs import ROLES, one_line_error, write_log

TINY = ["--epochs", "1", "--embedding-dim", "4"]
CUT = "2025-03-01"
CUT_SECONDS = "1740787200"  # 2025-03-01T00:00Z as epoch seconds


def _pretrain(data, out, *flags, roles=ROLES):
    assert main(["pretrain", str(data), *roles, *TINY, "--out", str(out), *flags]) == 0
    return out


def _test_rows(data, base, *flags, roles=ROLES):
    """Rows per segment that `evaluate` scores (from its --json report)."""
    report = base.parent / f"eval-{base.name}-{len(list(base.parent.glob('eval-*')))}.json"
    assert main(["evaluate", str(data), *roles, "--base", str(base), "--json", str(report), *flags]) == 0
    return {row["segment"]: row["rows"] for row in json.loads(report.read_text())["segments"]}


def _latest(frame, share):
    """Per segment, the rows in its latest ``share`` (the split's rule: round(n·share), with ties)."""
    counts = {}
    for segment, times in frame.groupby("country")["ts"]:
        ordered = np.sort(pd.to_datetime(times).to_numpy())
        counts[segment] = int((ordered >= ordered[len(ordered) - max(1, round(len(ordered) * share))]).sum())
    return counts


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("remembers")
    log = root / "log.csv"
    frame = write_log(log)
    dated = _pretrain(log, root / "dated", "--test-start", CUT)
    fractioned = _pretrain(log, root / "fractioned", "--test-fraction", "0.3")
    return {"root": root, "log": log, "frame": frame, "dated": dated, "fractioned": fractioned}


def test_the_base_records_its_data_source(made):
    assert json.loads((made["dated"] / "data_source.json").read_text()) == {
        "format": "interactions",
        "segment_col": "country",
        "test_start": CUT,
        "valid_fraction": 0.15,
        "exclude_segments": [],
        "min_segment_rows": 0,
    }
    assert json.loads((made["fractioned"] / "data_source.json").read_text())["test_fraction"] == 0.3


def test_a_remembered_test_start_holds_out_the_same_rows(made, capsys):
    frame = made["frame"]
    after = frame[pd.to_datetime(frame["ts"]) >= pd.Timestamp(CUT)].groupby("country").size().to_dict()
    assert _test_rows(made["log"], made["dated"]) == after
    assert _test_rows(made["log"], made["dated"], "--test-start", CUT_SECONDS) == after  # the same cut
    fine = ["finetune", str(made["log"]), *ROLES, "--base", str(made["dated"]), "--segment", "south", *TINY[:2]]
    capsys.readouterr()
    assert main([*fine, "--out", str(made["root"] / "adapter")]) == 0
    assert f"on {after['south']:,} rows" in capsys.readouterr().out


def test_a_different_test_cut_is_refused_naming_both_values(made, capsys):
    evaluate = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["dated"])]
    record = str(made["dated"] / "data_source.json")
    one_line_error(
        [*evaluate, "--test-start", "2025-02-15"],
        capsys,
        f"--test-start 2025-02-15 differs from the base's {CUT} ({record})",
        "the base would be scored on rows it trained on",
    )
    one_line_error(
        [*evaluate, "--test-fraction", "0.2"], capsys, f"--test-fraction 0.2 differs from the base's --test-start {CUT}"
    )
    fine = ["finetune", str(made["log"]), *ROLES, "--base", str(made["dated"]), "--segment", "south"]
    one_line_error(
        [*fine, "--out", str(made["root"] / "x"), "--valid-fraction", "0.3"], capsys, "--valid-fraction 0.3 differs"
    )


def test_a_remembered_test_fraction(made, capsys):
    assert _test_rows(made["log"], made["fractioned"]) == _latest(made["frame"], 0.3)
    evaluate = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["fractioned"])]
    one_line_error([*evaluate, "--test-fraction", "0.2"], capsys, "--test-fraction 0.2 differs from the base's 0.3")
    one_line_error(
        [*evaluate, "--test-start", CUT], capsys, f"--test-start {CUT} differs from the base's --test-fraction 0.3"
    )


def test_a_base_without_a_record_works_as_before(made, tmp_path):
    old = _pretrain(made["log"], tmp_path / "old", "--test-fraction", "0.3")
    (old / "data_source.json").unlink()
    assert _test_rows(made["log"], old) == _latest(made["frame"], 0.2)  # the defaults, not the 0.3 it used
    assert _test_rows(made["log"], old, "--test-start", CUT)  # any cut is taken


def test_merge_and_dense_finetune_carry_the_record(made):
    fine = ["finetune", str(made["log"]), *ROLES, "--base", str(made["dated"]), "--segment", "south", *TINY[:2]]
    dense, adapter, merged = (made["root"] / name for name in ("dense", "carry-adapter", "merged"))
    assert main([*fine, "--method", "dense", "--out", str(dense)]) == 0
    assert main([*fine, "--out", str(adapter)]) == 0
    assert main(["merge", "--base", str(made["dated"]), "--adapter", str(adapter), "--out", str(merged)]) == 0
    record = (made["dated"] / "data_source.json").read_text()
    for base in (dense, merged):
        assert (base / "data_source.json").read_text() == record
        assert _test_rows(made["log"], base) == _test_rows(made["log"], made["dated"])


def _movielens_100k(folder, users=40, items=30, ratings=1200):
    """An ML-100K folder (u.data, u.user, u.item) whose users are writers or educators."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    user, item = rng.integers(1, users + 1, ratings), rng.integers(1, items + 1, ratings)
    stamps = rng.integers(874_724_710, 893_286_638, ratings)
    rating = rng.integers(1, 6, ratings)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in zip(user, item, rating, stamps)))
    occupation = ["writer", "educator"]
    (folder / "u.user").write_text(
        "".join(f"{u}|{20 + u}|{'MF'[u % 2]}|{occupation[u % 3 == 0]}|{10000 + u}\n" for u in range(1, users + 1))
    )
    flags = lambda i: "|".join("1" if g == i % 19 else "0" for g in range(19))  # noqa: E731
    (folder / "u.item").write_bytes(
        "".join(f"{i}|Film {i} (1995)|01-Jan-1995||http://x/{i}|{flags(i)}\n" for i in range(1, items + 1)).encode(
            "latin-1"
        )
    )
    return folder


def test_movielens_segment_by_is_remembered(tmp_path, capsys):
    data = _movielens_100k(tmp_path / "ml-100k")
    base = _pretrain(data, tmp_path / "base", "--segment-by", "occupation", "--quiet", roles=[])
    fine = ["finetune", str(data), "--base", str(base), "--segment", "educator", "--quiet", *TINY[:2]]
    assert main([*fine, "--out", str(tmp_path / "educator")]) == 0
    assert set(_test_rows(data, base, "--quiet", roles=[])) == {"educator", "writer"}
    one_line_error(
        [*fine, "--segment-by", "gender", "--out", str(tmp_path / "x")],
        capsys,
        "--segment-by gender differs from the base's occupation",
    )
    (base / "data_source.json").unlink()  # a base from before the record: the error names the flag
    one_line_error([*fine, "--out", str(tmp_path / "y")], capsys, "its segments (--segment-by gender) are ['F', 'M']")


def _criteo(path, lines=240):
    """A Criteo TSV whose C9 holds one of two values."""
    rng = np.random.default_rng(0)
    rows = []
    for k in range(lines):
        ints = [str(int(v)) for v in rng.integers(0, 50, 13)]
        cats = [f"{int(v):08x}" for v in rng.integers(0, 6, 26)]
        cats[8] = ["0000000a", "0000000b"][k % 2]
        rows.append("\t".join([str(int(rng.random() < 0.3)), *ints, *cats]))
    path.write_text("\n".join(rows) + "\n")
    return path


def test_criteo_segment_is_remembered_and_a_base_without_one_evaluates(tmp_path, capsys):
    data = _criteo(tmp_path / "day.tsv")
    segmented = _pretrain(data, tmp_path / "segmented", "--criteo-segment", "C9", "--quiet", roles=[])
    assert set(_test_rows(data, segmented, "--quiet", roles=[])) == {"0000000a", "0000000b"}
    evaluate = ["evaluate", str(data), "--base", str(segmented), "--quiet"]
    one_line_error([*evaluate, "--criteo-segment", "C10"], capsys, "--criteo-segment C10 differs from the base's C9")
    whole = _pretrain(data, tmp_path / "whole", "--quiet", roles=[])
    assert _test_rows(data, whole, "--quiet", roles=[]) == {"(all rows)": 48}  # the latest 20% of the lines
    one_line_error(
        [*evaluate[:3], str(whole), "--criteo-segment", "C9"],
        capsys,
        "--criteo-segment C9 differs from the base's none",
    )
