"""``--date-format`` and ``--time-unit`` reach the loader: a day-first text column that the data
cannot prove is refused naming the flag and read with it; an epoch column is read in the unit
given (a wrong one is refused naming the column), else in the unit its magnitude shows."""

import numpy as np
import pandas as pd
import pytest

from recpeft.cli import main

ROLES = ["--user", "uid", "--item", "sku", "--label", "clicked", "--segment-col", "country", "--timestamp", "ts"]
PRETRAIN = ["--epochs", "1", "--embedding-dim", "4", "--quiet"]


def _log(path, times):
    rng = np.random.default_rng(0)
    rows = len(times)
    frame = pd.DataFrame(
        {
            "uid": rng.integers(0, 30, rows),
            "sku": rng.integers(0, 20, rows),
            "clicked": np.arange(rows) % 2,
            "country": np.where(np.arange(rows) % 3 == 0, "north", "south"),
            "ts": times,
        }
    )
    frame.to_csv(path, index=False)
    return path


JAN_1_2026 = 1_767_225_600  # epoch seconds


def _seconds(rows=600):
    """Epoch seconds over the first 12 days of 2026 (day and month both ≤ 12: an ambiguous order)."""
    return JAN_1_2026 + np.sort(np.random.default_rng(1).integers(0, 12 * 86400, rows))


def _pretrain(log, out, *flags):
    return main(["pretrain", str(log), *ROLES, *PRETRAIN, "--out", str(out), *flags])


def test_day_first_dates_need_the_date_format_flag(tmp_path, capsys):
    log = _log(tmp_path / "log.csv", pd.to_datetime(_seconds(), unit="s").strftime("%d/%m/%Y %H:%M"))
    assert _pretrain(log, tmp_path / "refused") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'ts'" in err and "--date-format" in err, err
    assert _pretrain(log, tmp_path / "base", "--date-format", "%d/%m/%Y %H:%M") == 0


@pytest.mark.parametrize("unit, scale", [("s", 1), ("ms", 1000)])
def test_epoch_times_are_read_in_the_given_or_detected_unit(tmp_path, capsys, unit, scale):
    log = _log(tmp_path / "log.csv", _seconds() * scale)
    assert _pretrain(log, tmp_path / "detected") == 0
    assert _pretrain(log, tmp_path / "given", "--time-unit", unit) == 0
    if unit == "ms":  # milliseconds read as seconds land past the year 2262: refused naming the column
        assert _pretrain(log, tmp_path / "wrong", "--time-unit", "s") == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "'ts'" in err, err
