"""Timestamps are never guessed: day/month order proven or given, offsets converted to UTC, epoch
units by magnitude or given; every refusal names the column and the row."""

import numpy as np
import pandas as pd
import pytest

from recpeft.datasets import Schema, load_interactions, split_by_time
from recpeft.datasets.sources import Roles, load_source

SCHEMA = Schema(user="user", item="item", label="label", segment="market", timestamp="time")


def _log(times, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(times)
    return pd.DataFrame(
        {
            "user": rng.integers(0, 9, n),
            "item": rng.integers(0, 9, n),
            "label": rng.integers(0, 2, n),
            "market": rng.choice(["DE", "FR"], n),
            "time": list(times),
        }
    )


def _instants(seed: int, n: int = 60) -> pd.DatetimeIndex:
    """Random whole-second UTC instants in 2025-2026, always including a day above 12."""
    rng = np.random.default_rng(seed)
    seconds = rng.integers(1_735_689_600, 1_798_761_600, size=n)
    seconds[0] = 1_736_899_200  # 2025-01-15
    return pd.to_datetime(seconds, unit="s").as_unit("ns")


def _csv(tmp_path, frame, name="log.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize("pattern", ["%d/%m/%Y", "%m/%d/%Y %H:%M:%S", "%d.%m.%Y %H:%M", "%m-%d-%Y"])
def test_numeric_dates_follow_the_order_a_value_proves(tmp_path, pattern):
    truth = _instants(1)
    frame = load_interactions(_csv(tmp_path, _log(truth.strftime(pattern))), SCHEMA)
    expected = pd.to_datetime(truth.strftime(pattern), format=pattern)
    np.testing.assert_array_equal(frame["time"].to_numpy(), expected.to_numpy())


def test_ambiguous_day_month_dates_are_refused_unless_the_format_is_given(tmp_path):
    days = pd.to_datetime(["2026-01-02", "2026-02-01", "2026-03-04", "2026-12-11"])
    path = _csv(tmp_path, _log(days.strftime("%d/%m/%Y")))
    with pytest.raises(
        ValueError, match=r"log\.csv: column 'time', row 1: the date '02/01/2026' is ambiguous.*date_format"
    ):
        load_interactions(path, SCHEMA)
    frame = load_interactions(path, SCHEMA, date_format="%d/%m/%Y")
    np.testing.assert_array_equal(frame["time"].to_numpy(), days.to_numpy())
    frame, _ = load_source(path, "interactions", Roles(segment="market", timestamp="time", date_format="%d/%m/%Y"))
    np.testing.assert_array_equal(frame["time"].to_numpy(), days.to_numpy())
    with pytest.raises(
        ValueError, match=r"column 'time', row 1: cannot read the timestamp '02/01/2026' with date_format"
    ):
        load_interactions(path, SCHEMA, date_format="%Y-%m-%d")


def test_values_that_prove_both_orders_are_refused(tmp_path):
    path = _csv(tmp_path, _log(["13/01/2026", "02/01/2026", "01/14/2026"]))
    with pytest.raises(
        ValueError, match=r"column 'time', row 3: '01/14/2026' puts the month first, but '13/01/2026' \(row 1\)"
    ):
        load_interactions(path, SCHEMA)
    with pytest.raises(ValueError, match=r"row 1: '02/01/26' has a two-digit year"):
        load_interactions(_csv(tmp_path, _log(["02/01/26", "13/01/26"])), SCHEMA)


def test_utc_offsets_are_converted(tmp_path):
    truth = _instants(2)
    offsets = np.random.default_rng(3).choice(["+01:00", "+02:00", "-05:30", "Z"], size=len(truth))
    texts = []
    for instant, offset in zip(truth, offsets):
        local = (
            instant
            if offset == "Z"
            else instant + pd.Timedelta(hours=int(offset[:3]), minutes=int(offset[0] + offset[4:]))
        )
        texts.append(local.strftime("%Y-%m-%dT%H:%M:%S") + offset)
    frame = load_interactions(_csv(tmp_path, _log(texts)), SCHEMA)
    np.testing.assert_array_equal(frame["time"].to_numpy(), truth.to_numpy())


def test_offsets_on_some_rows_only_are_refused(tmp_path):
    path = _csv(tmp_path, _log(["2026-01-02 10:00+01:00", "2026-01-02 11:00+01:00", "2026-01-02 10:00"]))
    with pytest.raises(
        ValueError, match=r"column 'time', row 3: the timestamp '2026-01-02 10:00' has no UTC offset, but .* \(row 1\)"
    ):
        load_interactions(path, SCHEMA)


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_epoch_units_are_detected_by_magnitude(tmp_path, unit, suffix):
    truth = _instants(4)
    per = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}[unit]
    numbers = truth.to_numpy().astype("int64") // per
    path = tmp_path / f"log{suffix}"
    raw = _log(numbers)
    raw.to_parquet(path) if suffix == ".parquet" else raw.to_csv(path, index=False)
    frame = load_interactions(path, SCHEMA)
    np.testing.assert_array_equal(frame["time"].to_numpy().astype("int64"), numbers * per)


def test_time_unit_overrides_the_magnitude_and_bounds_are_checked(tmp_path):
    numbers = np.arange(1_000, 1_060)
    frame = load_interactions(_log(numbers), SCHEMA, time_unit="ms")
    np.testing.assert_array_equal(frame["time"].to_numpy().astype("int64"), numbers * 10**6)
    big = _log([1_767_225_600_000] * 3)
    with pytest.raises(ValueError, match=r"column 'time', index 0: the epoch time 1767225600000 in seconds is outside"):
        load_interactions(big, SCHEMA, time_unit="s")
    with pytest.raises(ValueError, match=r"time_unit must be one of"):
        load_interactions(big, SCHEMA, time_unit="minutes")


def test_mixed_epoch_units_are_refused(tmp_path):
    path = _csv(tmp_path, _log([1_767_225_600, 1_767_225_601, 1_767_225_602_000]))
    with pytest.raises(
        ValueError, match=r"log\.csv: column 'time', row 3: epoch times of mixed units: .* but row 1 holds"
    ):
        load_interactions(path, SCHEMA)


def test_iso_strings_and_seconds_read_as_before(tmp_path):
    truth = _instants(5)
    frame = load_interactions(_csv(tmp_path, _log(truth.strftime("%Y-%m-%d %H:%M:%S"))), SCHEMA)
    np.testing.assert_array_equal(frame["time"].to_numpy(), truth.to_numpy())
    frame = load_interactions(_log(truth.to_numpy().astype("int64") / 1e9), SCHEMA)
    np.testing.assert_array_equal(frame["time"].to_numpy(), truth.to_numpy())


def test_split_cuts_are_not_guessed():
    truth = _instants(6)
    frame = load_interactions(_log(truth), SCHEMA)
    with pytest.raises(ValueError, match=r"split_by_time: test_start: the date '02/10/2025' is ambiguous.*YYYY-MM-DD"):
        split_by_time(frame, SCHEMA, test_start="02/10/2025")
    cut = pd.Timestamp("2025-10-02")
    by_ms = split_by_time(frame, SCHEMA, test_start=int(cut.value // 10**6))
    by_text = split_by_time(frame, SCHEMA, test_start="2025-10-02")
    assert by_ms.test.index.tolist() == by_text.test.index.tolist() == frame.index[frame["time"] >= cut].tolist()


def test_online_retail_dates_are_not_guessed(tmp_path):
    from recpeft.datasets.online_retail import load_online_retail

    truth = pd.to_datetime(["2011-01-13 08:26", "2011-02-01 09:00", "2011-03-02 17:45"])
    rows = pd.DataFrame(
        {
            "Description": ["A", "B", "C"],
            "Quantity": [1, 2, 3],
            "UnitPrice": [1.0, 2.0, 3.0],
            "CustomerID": [12000.0, 12001.0, 12002.0],
            "Country": ["France"] * 3,
        }
    )
    for pattern in ("%d/%m/%Y %H:%M", "%m/%d/%Y %H:%M"):
        rows["InvoiceDate"] = truth.strftime(pattern)
        rows.to_csv(tmp_path / "retail.csv", index=False)
        loaded = load_online_retail(tmp_path / "retail.csv")
        np.testing.assert_array_equal(loaded["InvoiceDate"].to_numpy(), truth.to_numpy())
    rows["InvoiceDate"] = truth[1:].strftime("%d/%m/%Y %H:%M").tolist() + ["01/02/2011 10:00"]
    rows.to_csv(tmp_path / "retail.csv", index=False)
    with pytest.raises(
        ValueError, match=r"retail\.csv: column 'InvoiceDate', row 0: the date '01/02/2011 09:00' is ambiguous"
    ):
        load_online_retail(tmp_path / "retail.csv")
    loaded = load_online_retail(tmp_path / "retail.csv", date_format="%d/%m/%Y %H:%M")
    assert loaded["InvoiceDate"].dt.month.tolist() == [2, 3, 2]
