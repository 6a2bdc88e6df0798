"""Time-ordered train / validation / test splits.

``split_by_time`` (click models, the personalization protocol): per segment s, rows with time
t < v_s train, v_s ≤ t < c_s validate, t ≥ c_s test. The cuts c_s (test) and v_s (validation) are
the given ``test_start`` / ``valid_start`` when set, else time quantiles of the segment's own rows:
with the segment's n times sorted, t_(0) ≤ ... ≤ t_(n−1), c_s = t_(n − n_test) with
n_test = max(1, round(n · test_fraction)), and v_s likewise takes the n_valid = round(m ·
valid_fraction) latest of the m rows before c_s (at least 1 when the fraction is > 0). A row
at a cut goes to the later part, so all rows sharing one timestamp land in one part and the parts
may be slightly larger than their fraction. Each segment keeps its own most recent rows as its
test slice, so a small market's test data is its own recent past rather than the big market's.
A segment left without train or test rows is an error naming it; with ``strict=False`` it is kept,
and ``TimeSplit.empty_parts`` says what it lacks (validation rows too, where a validation share
or start is given), so that a caller can leave it out instead of stopping.

``leave_last_out`` (ranking): per user, ordered by time (ties by row order), the last interaction
is the test row and the second last the validation row; users with fewer than
``min_interactions`` rows stay wholly in training.

Example::

    parts = split_by_time(frame, schema, test_fraction=0.2, valid_fraction=0.1)
    parts.train, parts.valid, parts.test, parts.cuts["DE"]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .interactions import canonical_text, day_month_order, epoch_to_ns, parse_timestamps, shown
from .schema import Schema

ALL_ROWS = "(all rows)"  # the one group's name when the schema has no segment column


@dataclass
class TimeSplit:
    """Three parts of one table, each with the original index and row order.

    ``cuts``: group (segment name, or ``ALL_ROWS``) → (validation start, test start) timestamps;
    ``counts``: group → its (train, valid, test) row counts; ``expects_valid``: whether the split
    was asked for validation rows. ``cuts`` and ``counts`` are empty for ``leave_last_out``."""

    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    cuts: dict[str, tuple[pd.Timestamp, pd.Timestamp]] = field(default_factory=dict)
    counts: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    expects_valid: bool = True

    def empty_parts(self, group: str) -> list[str]:
        """The parts ("train", "valid", "test") that ``group`` has no rows in; "valid" only where
        the split was asked for validation rows."""
        names = ("train", "valid", "test") if self.expects_valid else ("train", "test")
        counts = dict(zip(("train", "valid", "test"), self.counts[group]))
        return [part for part in names if counts[part] == 0]


def cut_ns(value, name: str = "cut") -> int:
    """A cut as int64 ns since the epoch: numbers are epoch times, their unit by magnitude (as
    ``parse_timestamps`` reads a column); a day/month string such as ``02/01/2026`` is refused
    unless its day is above 12; anything else goes through ``pd.Timestamp`` (timezone-aware values
    are converted to UTC)."""
    where = lambda pos: f"split_by_time: {name}"  # noqa: E731
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        if float(value).is_integer() and abs(value) < 1e11:
            return int(round(float(value) * 1e9))  # epoch seconds, exactly as before
        return int(epoch_to_ns(np.array([value]), where, None)[0])
    if isinstance(value, str):
        day_month_order(pd.Series([value.strip()]), where, "; or write the cut as YYYY-MM-DD")
    try:
        stamp = pd.Timestamp(value)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"split_by_time: {name} {value!r} is not a time: {exc}") from None
    if stamp.tzinfo is not None:
        stamp = stamp.tz_convert("UTC").tz_localize(None)
    return int(stamp.as_unit("ns").value)


def _times_ns(frame: pd.DataFrame, column: str, caller: str) -> np.ndarray:
    if column not in frame.columns:
        raise ValueError(f"{caller}: no column {column!r}; the available columns are {list(frame.columns)}")
    parsed = parse_timestamps(
        frame[column], lambda pos: f"{caller}: column {column!r}, index {shown(frame.index[pos])}"
    )
    return parsed.to_numpy().astype("int64")


def _latest_cut(sorted_times: np.ndarray, count: int) -> int:
    """The cut that puts the ``count`` latest of ``sorted_times`` (plus ties) on the later side."""
    if count <= 0:
        return np.iinfo(np.int64).max
    return int(sorted_times[max(len(sorted_times) - count, 0)])


def split_by_time(
    frame: pd.DataFrame,
    schema: Schema,
    *,
    test_start=None,
    valid_start=None,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.1,
    strict: bool = True,
) -> TimeSplit:
    """Split ``frame`` (N rows) by time, per segment (see the module docstring).

    Args:
        frame: rows with the schema's timestamp (and segment, if any) column.
        test_start, valid_start: fixed cuts (date strings, Timestamps or epoch seconds) for every
            segment; None: per-segment quantiles from the fractions.
        test_fraction: share of each segment's rows for test, in (0, 1).
        valid_fraction: share of each segment's rows before its test cut for validation, in [0, 1).
        strict: raise ValueError naming a segment whose train or test part is empty; False keeps
            it (see ``TimeSplit.empty_parts``).
    """
    if schema.timestamp is None:
        raise ValueError("split_by_time: the schema has no timestamp column")
    if not 0 < test_fraction < 1 or not 0 <= valid_fraction < 1 or test_fraction + valid_fraction >= 1:
        raise ValueError(
            f"split_by_time: need 0 < test_fraction < 1, 0 ≤ valid_fraction and a sum < 1; "
            f"got test_fraction={test_fraction}, valid_fraction={valid_fraction}"
        )
    fixed_test = None if test_start is None else cut_ns(test_start, "test_start")
    fixed_valid = None if valid_start is None else cut_ns(valid_start, "valid_start")
    if fixed_test is not None and fixed_valid is not None and fixed_valid > fixed_test:
        raise ValueError(f"split_by_time: valid_start {valid_start!r} is after test_start {test_start!r}")
    times = _times_ns(frame, schema.timestamp, "split_by_time")
    if schema.segment is None:
        groups = {ALL_ROWS: np.arange(len(frame))}
    else:
        if schema.segment not in frame.columns:
            raise ValueError(
                f"split_by_time: no segment column {schema.segment!r}; the available columns are {list(frame.columns)}"
            )
        codes, names = pd.factorize(canonical_text(frame[schema.segment]).str.strip(), sort=True)
        groups = {str(name): np.flatnonzero(codes == k) for k, name in enumerate(names)}
    part = np.zeros(len(frame), dtype=np.int8)  # 0 train, 1 valid, 2 test
    cuts, counts = {}, {}
    expects_valid = valid_fraction > 0 or fixed_valid is not None
    for name, rows in groups.items():
        t = times[rows]
        ordered = np.sort(t)
        n = len(t)
        test_cut = fixed_test if fixed_test is not None else _latest_cut(ordered, max(1, round(n * test_fraction)))
        before = ordered[ordered < test_cut]
        if fixed_valid is not None:
            valid_cut = min(fixed_valid, test_cut)
        else:
            n_valid = max(1, round(len(before) * valid_fraction)) if valid_fraction > 0 else 0
            valid_cut = min(_latest_cut(before, n_valid), test_cut) if len(before) else test_cut
        part[rows] = np.where(t >= test_cut, 2, np.where(t >= valid_cut, 1, 0))
        counts[name] = tuple(int(c) for c in np.bincount(part[rows], minlength=3))
        cuts[name] = (pd.Timestamp(valid_cut), pd.Timestamp(test_cut))
    split = TimeSplit(frame[part == 0], frame[part == 1], frame[part == 2], cuts, counts, expects_valid)
    if strict:
        for name in groups:
            empty = [p for p in split.empty_parts(name) if p != "valid"]  # an empty validation part is allowed
            if empty:
                raise ValueError(
                    f"split_by_time: segment {name!r} has an empty {empty[0]} part "
                    f"(train/valid/test rows {list(counts[name])}, test from {cuts[name][1]}); "
                    "it needs rows on both sides of the cut — check its timestamps or the cuts"
                )
    return split


def leave_last_out(frame: pd.DataFrame, user_col: str, time_col: str, *, min_interactions: int = 3) -> TimeSplit:
    """Per user: last interaction → test, second last → valid, the rest → train.

    Args:
        frame: N interaction rows.
        user_col, time_col: the user and timestamp columns.
        min_interactions: users with fewer rows (≥ 3, so each evaluated user keeps a training row)
            stay wholly in train.
    """
    if min_interactions < 3:
        raise ValueError(f"leave_last_out: min_interactions must be ≥ 3, got {min_interactions}")
    if user_col not in frame.columns:
        raise ValueError(f"leave_last_out: no column {user_col!r}; the available columns are {list(frame.columns)}")
    times = _times_ns(frame, time_col, "leave_last_out")
    users, _ = pd.factorize(frame[user_col])
    order = np.lexsort((np.arange(len(frame)), times, users))  # by user, then time, then row
    sorted_users = users[order]
    counts = np.bincount(users)
    ends = np.cumsum(counts)  # one past each user's last sorted position
    from_end = ends[sorted_users] - 1 - np.arange(len(frame))  # 0 = the user's last row
    part_sorted = np.where(
        counts[sorted_users] < min_interactions, 0, np.where(from_end == 0, 2, np.where(from_end == 1, 1, 0))
    )
    part = np.empty(len(frame), dtype=np.int64)
    part[order] = part_sorted
    if not (part == 2).any():
        raise ValueError(f"leave_last_out: no user in column {user_col!r} has {min_interactions} or more rows")
    return TimeSplit(frame[part == 0], frame[part == 1], frame[part == 2])
