"""Loading a user's interaction log (DataFrame, CSV, CSV.gz or Parquet) and checking it.

``load_interactions`` keeps the schema's columns only, in the schema's order, and returns them
normalised:

=============  ==============================================================================
role           after loading
=============  ==============================================================================
user, item,    canonical ids (``canonical_ids``): a column whose values are all integers (ints,
categorical    integral floats, or decimal text without leading zeros such as ``"126"``) is
               int64, any other column is strings, ints written as their decimal text and
               strings kept verbatim (``"0126"`` stays ``"0126"``). CSV id columns are read as
               text, so the same rows give the same ids from CSV, Parquet or a DataFrame. A
               missing value is an error; values with surrounding spaces are kept, with a warning
label          float32 0.0 / 1.0 (from 0/1 numbers or booleans; anything else is an error)
dense          float64, finite (non-numeric, missing or infinite values are errors)
segment        strings (canonical text, as ids); leading/trailing spaces are stripped with a
               warning naming the column, so ``" DE"`` and ``"DE"`` are one segment
timestamp      datetime64[ns], naive UTC (see ``parse_timestamps``): datetimes; ISO 8601 or
               other unambiguous date strings, offsets converted to UTC; day/month numeric dates
               (``02/01/2026``) only when ``date_format`` is given or a value in the column
               proves the order; numbers as epoch seconds, ms, µs or ns (by magnitude, or
               ``time_unit``)
=============  ==============================================================================

In a CSV only an empty field is missing: ``NA`` (Namibia) or ``null`` are values like any other.

Every error names the source (the file path, or ``name`` / "DataFrame"), the column and the first
bad row: for files the 1-based data row (row 1 is the first line after the header), for a
DataFrame its index label. The result has a fresh RangeIndex, so row i of it is data row i + 1.

Example::

    frame = load_interactions("log.parquet", Schema(segment="market", dense=("price",)))
    check_segments(frame, schema, ["DE", "FR"])
"""

from __future__ import annotations

import gzip
import math
import re
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

from .formats import TIME_UNITS
from .schema import Schema

CSV_SUFFIXES = (".csv", ".csv.gz")
PARQUET_SUFFIXES = (".parquet", ".pq")


class RowLocator:
    """Where a frame came from, to word error messages: ``source.at(column, pos)`` →
    ``"log.csv: column 'label', row 3"`` (file) or ``"DataFrame: column 'label', index 7"``."""

    def __init__(self, name: str, frame: pd.DataFrame, is_file: bool):
        self.name, self.frame, self.is_file = name, frame, is_file

    def row(self, pos: int) -> str:
        return f"row {pos + 1}" if self.is_file else f"index {shown(self.frame.index[pos])}"

    def at(self, column: str, pos: int) -> str:
        return f"{self.name}: column {column!r}, {self.row(pos)}"


def shown(value) -> str:
    """``repr`` of a cell for an error message, numpy scalars as plain Python values (``2``, not
    ``np.int64(2)``)."""
    return repr(value.item() if isinstance(value, np.generic) else value)


def _first(mask: np.ndarray | pd.Series) -> int | None:
    """Position of the first True in ``mask``, or None."""
    hits = np.flatnonzero(np.asarray(mask, dtype=bool))
    return int(hits[0]) if hits.size else None


def _text_columns(schema: Schema) -> list[str]:
    """The columns a CSV reader must keep as text: ids, categorical values and segment names."""
    return list(schema.sparse_features) + ([schema.segment] if schema.segment else [])


def _csv_problem(path: Path, exc: Exception) -> str:
    """One line saying why ``path`` could not be read as CSV."""
    head = b""
    try:
        opener = gzip.open if path.name.lower().endswith(".gz") else open
        with opener(path, "rb") as handle:
            head = handle.read(4096)
    except (OSError, EOFError):
        pass
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return f"{path}: the CSV file is UTF-16 text; save it as UTF-8"
    if b"\x00" in head:
        return f"{path}: not a CSV text file (it holds NUL bytes: a binary file?)"
    what = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{path}: not a valid CSV file: {what}"


def _read_file(path: Path, schema: Schema) -> pd.DataFrame:
    """Read a CSV (optionally gzip) or Parquet file; empty and unreadable files are errors."""
    lower = path.name.lower()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if lower.endswith(CSV_SUFFIXES):
        try:
            frame = pd.read_csv(
                path,
                dtype={c: str for c in _text_columns(schema)},
                keep_default_na=False,
                na_values=[""],
            )
        except pd.errors.EmptyDataError:
            raise ValueError(f"{path}: the file is empty (no header, no rows)") from None
        except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError, ValueError) as exc:
            raise ValueError(_csv_problem(path, exc)) from None
        if len(frame.columns) == 1 and schema.columns and frame.columns[0] not in schema.columns:
            header = str(frame.columns[0])
            for sep in (";", "\t", "|"):
                if sep in header:
                    raise ValueError(
                        f"{path}: the header is one column {header!r}; the file seems to be separated by "
                        f"{sep!r}, but recpeft reads comma-separated CSV: convert it (or save it as Parquet)"
                    )
        return frame
    if lower.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            available = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{path}: not a valid Parquet file: {_one_line(exc)}") from None
        _check_columns(available, schema, str(path))
        try:
            return pd.read_parquet(path, columns=list(schema.columns))
        except Exception as exc:  # corrupt pages, unsupported types: pyarrow's many exception types
            raise ValueError(f"{path}: cannot read the Parquet data: {_one_line(exc)}") from None
    raise ValueError(f"{path}: unknown file type; use one of {CSV_SUFFIXES + PARQUET_SUFFIXES}")


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _check_columns(available: Iterable[str], schema: Schema, name: str) -> None:
    available = [str(c) for c in available]
    missing = [c for c in schema.columns if c not in available]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; the available columns are {available}")


# -- ids --------------------------------------------------------------------------------------------
DECIMAL_ID = re.compile(r"-?(?:0|[1-9][0-9]*)")
_INT64 = (-(2**63), 2**63 - 1)


def _text(value) -> str:
    """The canonical text of one id: ints (and integral floats) as decimal text, strings verbatim."""
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)) and math.isfinite(value) and float(value).is_integer():
        return str(int(value))
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def canonical_text(values: pd.Series) -> pd.Series:
    """Every value as its canonical text (see ``canonical_ids``), same index; computed per distinct
    value. Missing values stay missing (None)."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    texts = np.array([_text(v) for v in np.asarray(uniques, dtype=object)] + [None], dtype=object)
    return pd.Series(texts[codes], index=values.index, dtype=object)


def canonical_ids(values: pd.Series) -> pd.Series:
    """One canonical type for an id column, whatever the file format: integer columns as they
    are; a column whose canonical texts are all decimal integers without leading zeros (``"126"``,
    ``126.0``, ``"-3"``) as int64; any other column as strings (``"0126"`` stays ``"0126"``).
    So ``126`` read from Parquet and ``"126"`` read from CSV are one id, ``"0126"`` another."""
    if pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values
    texts = canonical_text(values)
    codes, distinct = pd.factorize(texts, use_na_sentinel=True)
    if len(distinct) and (codes >= 0).all() and all(DECIMAL_ID.fullmatch(t) for t in distinct):
        numbers = [int(t) for t in distinct]
        if _INT64[0] <= min(numbers) and max(numbers) <= _INT64[1]:
            return pd.Series(np.array(numbers, dtype=np.int64)[codes], index=values.index)
    return texts


def _spaced(texts: pd.Series) -> np.ndarray:
    """Mask of the string values with leading or trailing whitespace."""
    filled = texts.fillna("")
    return (filled != filled.str.strip()).to_numpy()


# -- timestamps -------------------------------------------------------------------------------------
_NS_PER = {"s": 10**9, "ms": 10**6, "us": 10**3, "ns": 1}
#: epoch magnitude bands: |t| below 1e11 is seconds (up to year 5138), below 1e14 milliseconds,
#: below 1e17 microseconds, else nanoseconds; from 1973 on each unit sits in its own band
_UNIT_BANDS = ((1e11, "s"), (1e14, "ms"), (1e17, "us"), (math.inf, "ns"))
_UNIT_WORDS = {"s": "seconds", "ms": "milliseconds", "us": "microseconds", "ns": "nanoseconds"}
_NS_LIMIT = 9.2e18  # |ns since the epoch| a datetime64[ns] holds (years 1677 to 2262)
#: numeric day/month/year dates, year last: 02/01/2026, 2.1.2026, 02-01-2026 (time may follow)
_DAY_MONTH = re.compile(r"(\d{1,2})([/.\-])(\d{1,2})\2(\d{4})(?=$|[\sT])")
_TWO_DIGIT_YEAR = re.compile(r"\d{1,2}([/.\-])\d{1,2}\1\d{2}(?=$|[\sT])")
_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_OFFSET = re.compile(r"\d(?:Z|[+-]\d{2}:?\d{2})$", re.IGNORECASE)


def _row(where, pos: int) -> str:
    """The row part of ``where(pos)`` ("row 3" or "index 7"), to name a second row in a message."""
    return where(pos).rsplit(", ", 1)[-1]


def check_time_options(date_format: str | None, time_unit: str | None, what: str = "load_interactions") -> None:
    if date_format is not None and (not isinstance(date_format, str) or "%" not in date_format):
        raise ValueError(f"{what}: date_format must be a strftime pattern such as '%d/%m/%Y', got {date_format!r}")
    if time_unit is not None and time_unit not in TIME_UNITS:
        raise ValueError(f"{what}: time_unit must be one of {TIME_UNITS}, got {time_unit!r}")


def epoch_to_ns(numbers: np.ndarray, where, unit: str | None) -> np.ndarray:
    """Epoch numbers (float64 or int64 [N]) as int64 ns; the unit by magnitude unless given."""
    finite = np.isfinite(numbers.astype("float64"))
    if not finite.all():
        pos = int(np.flatnonzero(~finite)[0])
        raise ValueError(f"{where(pos)}: the timestamp is missing or not finite ({shown(numbers[pos])})")
    magnitude = np.abs(numbers.astype("float64"))
    if unit is None:
        bands = np.searchsorted([b for b, _ in _UNIT_BANDS[:-1]], magnitude, side="right")
        used = np.unique(bands[magnitude > 0])
        if len(used) > 1:
            low = int(np.flatnonzero((bands == used[0]) & (magnitude > 0))[0])
            high = int(np.flatnonzero(bands == used[-1])[0])
            raise ValueError(
                f"{where(high)}: epoch times of mixed units: {shown(numbers[high])} looks like "
                f"{_UNIT_WORDS[_UNIT_BANDS[used[-1]][1]]} but {_row(where, low)} holds "
                f"{shown(numbers[low])}, which looks like {_UNIT_WORDS[_UNIT_BANDS[used[0]][1]]}; "
                "give the unit (time_unit / --time-unit s|ms|us|ns)"
            )
        unit = _UNIT_BANDS[int(used[0])][1] if len(used) else "s"
    over = magnitude * _NS_PER[unit] > _NS_LIMIT
    if over.any():
        pos = int(np.flatnonzero(over)[0])
        raise ValueError(
            f"{where(pos)}: the epoch time {shown(numbers[pos])} in {_UNIT_WORDS[unit]} is outside the "
            "years 1677-2262; check time_unit"
        )
    if np.issubdtype(numbers.dtype, np.integer):
        return numbers.astype("int64") * _NS_PER[unit]
    return pd.to_datetime(numbers, unit=unit).as_unit("ns").asi8  # pandas may pick a coarser unit


def day_month_order(texts: pd.Series, where, column_hint: str) -> str | None:
    """ "dm" or "md" for a column of numeric dates with the year last, "" when it holds none;
    refuses a column where no value proves the order, or values prove both."""
    found = texts.str.match(_DAY_MONTH.pattern)
    if not found.any():
        two = texts.str.match(_TWO_DIGIT_YEAR.pattern)
        if two.any():
            pos = _first(two)
            raise ValueError(
                f"{where(pos)}: {shown(texts.iloc[pos])} has a two-digit year, so day, month and year "
                f"could be in any order; give the format (date_format / --date-format, e.g. '%d/%m/%y'){column_hint}"
            )
        return ""
    parts = texts[found].str.extract(_DAY_MONTH.pattern)
    first, second = parts[0].astype(int), parts[2].astype(int)
    day_first, month_first = first > 12, second > 12
    if day_first.any() and month_first.any():
        a, b = int(np.flatnonzero(day_first.to_numpy())[0]), int(np.flatnonzero(month_first.to_numpy())[0])
        rows = np.flatnonzero(found.to_numpy())
        raise ValueError(
            f"{where(int(rows[b]))}: {shown(texts.iloc[rows[b]])} puts the month first, but "
            f"{shown(texts.iloc[rows[a]])} ({_row(where, int(rows[a]))}) puts the day first; "
            f"give the format (date_format / --date-format){column_hint}"
        )
    if not day_first.any() and not month_first.any():
        pos = _first(found)
        sep = parts[1].iloc[0]
        raise ValueError(
            f"{where(pos)}: the date {shown(texts.iloc[pos])} is ambiguous (day/month or month/day, and no "
            f"value in the column has a day above 12); give the format (date_format / --date-format "
            f"'%d{sep}%m{sep}%Y' or '%m{sep}%d{sep}%Y'){column_hint}"
        )
    return "dm" if day_first.any() else "md"


def _to_iso(texts: pd.Series, order: str) -> pd.Series:
    """Rewrite the numeric day/month dates of ``texts`` as ISO dates (YYYY-MM-DD), the rest kept."""

    def rewrite(match: re.Match) -> str:
        a, b, year = int(match.group(1)), int(match.group(3)), match.group(4)
        day, month = (a, b) if order == "dm" else (b, a)
        return f"{year}-{month:02d}-{day:02d}"

    return texts.str.replace(_DAY_MONTH, rewrite, n=1, regex=True)


def _parse_text(texts: pd.Series, where, date_format: str | None) -> pd.Series:
    """Date/time strings (no missing values) as UTC-aware datetimes; errors name the row."""
    if date_format is not None:
        parsed = pd.to_datetime(texts, format=date_format, errors="coerce", utc=True)
        bad = _first(parsed.isna())
        if bad is not None:
            raise ValueError(
                f"{where(bad)}: cannot read the timestamp {shown(texts.iloc[bad])} with date_format {date_format!r}"
            )
        return parsed
    aware = texts.str.contains(_OFFSET.pattern, case=False, regex=True).to_numpy()
    if aware.any() and not aware.all():
        naive_pos, aware_pos = int(np.flatnonzero(~aware)[0]), int(np.flatnonzero(aware)[0])
        raise ValueError(
            f"{where(naive_pos)}: the timestamp {shown(texts.iloc[naive_pos])} has no UTC offset, but "
            f"{shown(texts.iloc[aware_pos])} ({_row(where, aware_pos)}) has one; give every "
            "timestamp an offset, or none (they are then read as UTC)"
        )
    order = day_month_order(texts, where, "")
    if order:
        texts = _to_iso(texts, order)
    parsed = pd.to_datetime(texts, format="ISO8601", errors="coerce", utc=True)
    for fallback in (None, "mixed"):  # one format inferred from the first value, then value by value
        retry = parsed.isna().to_numpy()
        if not retry.any():
            break
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pandas' "could not infer format" notice
            parsed[retry] = pd.to_datetime(texts[retry], format=fallback, errors="coerce", utc=True)
    bad = _first(parsed.isna())
    if bad is not None:
        raise ValueError(
            f"{where(bad)}: cannot read the timestamp {shown(texts.iloc[bad])} (use ISO 8601 such as "
            "'2026-01-02 10:00:00', a datetime, or epoch numbers; or give date_format / --date-format)"
        )
    return parsed


def parse_timestamps(
    values: pd.Series, where=None, *, date_format: str | None = None, time_unit: str | None = None
) -> pd.Series:
    """Timestamps as datetime64[ns], naive UTC, with ``values``' index.

    - datetimes: timezone-aware ones converted to UTC;
    - numbers (or text that is all numbers): epoch times, in ``time_unit`` or, when None, the unit
      their magnitude says (|t| < 1e11 seconds, < 1e14 ms, < 1e17 µs, else ns); a column whose
      values fall in two bands is refused;
    - text with ``date_format``: that strftime pattern, every value;
    - other text: ISO 8601 first, then any unambiguous form pandas reads. UTC offsets
      (``+01:00``, ``Z``) are converted to UTC; a column mixing values with and without an offset
      is refused. Numeric dates with the year last (``02/01/2026``) need a value with a day above
      12 to fix the order for the whole column (``13/01/2026``: day first), else — or when values
      disagree, or the year has two digits — they are refused.

    ``where(pos)`` words the location of row ``pos`` for errors (default "row {pos + 1}"); every
    error is one ValueError line naming it.
    """
    where = where or (lambda pos: f"row {pos + 1}")
    check_time_options(date_format, time_unit, "parse_timestamps")
    index = values.index
    missing = _first(values.isna()) if not pd.api.types.is_datetime64_any_dtype(values) else None
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
        bad = _first(parsed.isna())
        if bad is not None:
            raise ValueError(f"{where(bad)}: the timestamp is missing")
    elif pd.api.types.is_bool_dtype(values):
        raise ValueError(f"{where(0)}: booleans are not timestamps (got {shown(values.iloc[0])})")
    elif pd.api.types.is_numeric_dtype(values):
        return pd.Series(epoch_to_ns(values.to_numpy(), where, time_unit), index=index).astype("datetime64[ns]")
    else:
        if missing is not None:
            raise ValueError(f"{where(missing)}: the timestamp is missing")
        if not all(isinstance(v, str) for v in pd.unique(values)):
            parsed = pd.to_datetime(values, errors="coerce", utc=True)  # datetime objects, maybe with tz
            bad = _first(parsed.isna())
            if bad is not None:
                raise ValueError(f"{where(bad)}: cannot read the timestamp {shown(values.iloc[bad])}")
        else:
            texts = values.astype(str).str.strip()
            if date_format is None and texts.str.fullmatch(_NUMBER.pattern).all():
                numbers = pd.to_numeric(texts).to_numpy()
                return pd.Series(epoch_to_ns(numbers, where, time_unit), index=index).astype("datetime64[ns]")
            parsed = _parse_text(texts, where, date_format)
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    return parsed.astype("datetime64[ns]")


def _clean_label(values: pd.Series, source: RowLocator, column: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        return values.astype("float32")
    numbers = pd.to_numeric(values, errors="coerce") if not pd.api.types.is_numeric_dtype(values) else values
    bad = _first(~numbers.isin([0, 1]))
    if bad is not None:
        raw = values.iloc[bad]
        why = "is missing" if pd.isna(raw) else f"must be 0 or 1 (or a boolean), got {shown(raw)}"
        raise ValueError(f"{source.at(column, bad)}: the label {why}")
    return numbers.astype("float32")


def _clean_dense(values: pd.Series, source: RowLocator, column: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        return values.astype("float64")
    numbers = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = _first(~np.isfinite(numbers.to_numpy()))
    if bad is not None:
        raw = values.iloc[bad]
        why = "is missing" if pd.isna(raw) else f"must be a finite number, got {shown(raw)}"
        raise ValueError(f"{source.at(column, bad)}: the dense value {why}")
    return numbers


def _clean_ids(values: pd.Series, source: RowLocator, column: str) -> pd.Series:
    """Canonical ids (``canonical_ids``); a warning counts values with surrounding spaces."""
    ids = canonical_ids(values)
    if ids.dtype == object:
        spaced = _spaced(ids)
        if spaced.any():
            pos = int(np.flatnonzero(spaced)[0])
            warnings.warn(
                f"{source.at(column, pos)}: {int(spaced.sum())} value(s) have leading or trailing spaces, "
                f"e.g. {shown(ids.iloc[pos])}; they are kept as they are, so {shown(ids.iloc[pos])} and "
                f"{shown(ids.iloc[pos].strip())} are different ids",
                stacklevel=4,
            )
    return ids


def _clean_segments(values: pd.Series, source: RowLocator, column: str) -> pd.Series:
    """Segment names as canonical text, stripped of surrounding spaces (with a warning)."""
    texts = canonical_text(values)
    spaced = _spaced(texts)
    if spaced.any():
        pos = int(np.flatnonzero(spaced)[0])
        warnings.warn(
            f"{source.at(column, pos)}: stripped leading/trailing spaces from {int(spaced.sum())} segment "
            f"value(s), e.g. {shown(texts.iloc[pos])} → {shown(texts.iloc[pos].strip())}, so they join the "
            "segment of that name",
            stacklevel=4,
        )
        texts = texts.str.strip()
    return texts


def validate_frame(
    frame: pd.DataFrame,
    schema: Schema,
    name: str = "DataFrame",
    is_file: bool = False,
    *,
    date_format: str | None = None,
    time_unit: str | None = None,
) -> pd.DataFrame:
    """Check and normalise ``frame`` as the module docstring says; returns a new frame.
    ``date_format`` / ``time_unit``: how to read the timestamp column (see ``parse_timestamps``)."""
    check_time_options(date_format, time_unit)
    _check_columns(frame.columns, schema, name)
    if len(frame) == 0:
        raise ValueError(f"{name}: no data rows")
    frame = frame.loc[:, list(schema.columns)]
    source = RowLocator(name, frame, is_file)
    out = {}
    ids = list(schema.sparse_features) + ([schema.segment] if schema.segment else [])
    for column in ids:
        bad = _first(frame[column].isna())
        if bad is not None:
            raise ValueError(f"{source.at(column, bad)}: missing id (fill it, e.g. with a token such as 'unknown')")
    for column in schema.sparse_features:
        out[column] = _clean_ids(frame[column], source, column)
    if schema.segment:
        out[schema.segment] = _clean_segments(frame[schema.segment], source, schema.segment)
    if schema.label:
        out[schema.label] = _clean_label(frame[schema.label], source, schema.label)
    for column in schema.dense:
        out[column] = _clean_dense(frame[column], source, column)
    if schema.timestamp:
        column = schema.timestamp
        out[column] = parse_timestamps(
            frame[column], lambda pos: source.at(column, pos), date_format=date_format, time_unit=time_unit
        )
    return pd.DataFrame({c: out[c].reset_index(drop=True) for c in schema.columns})


def load_interactions(
    source: pd.DataFrame | str | Path,
    schema: Schema,
    *,
    name: str | None = None,
    date_format: str | None = None,
    time_unit: str | None = None,
) -> pd.DataFrame:
    """Read and validate an interaction table.

    Args:
        source: a DataFrame, or a path ending in ``.csv``, ``.csv.gz``, ``.parquet`` or ``.pq``.
        schema: the column roles.
        name: how errors name a DataFrame source (default "DataFrame"); files are named by path.
        date_format: strftime pattern of the timestamp strings (e.g. ``"%d/%m/%Y"``); None: ISO 8601
            and other unambiguous forms only (see ``parse_timestamps``).
        time_unit: "s", "ms", "us" or "ns" for epoch-number timestamps; None: by magnitude.

    Returns:
        A DataFrame with the schema's columns, normalised (see the module docstring), N rows.
    """
    if isinstance(source, pd.DataFrame):
        return validate_frame(
            source, schema, name or "DataFrame", is_file=False, date_format=date_format, time_unit=time_unit
        )
    if isinstance(source, (str, Path)):
        path = Path(source)
        return validate_frame(
            _read_file(path, schema), schema, str(path), is_file=True, date_format=date_format, time_unit=time_unit
        )
    raise TypeError(f"load_interactions: source must be a DataFrame or a path, got {type(source).__name__}")


def check_segments(
    frame: pd.DataFrame, schema: Schema, segments: Iterable[str], *, name: str = "DataFrame"
) -> dict[str, int]:
    """Rows per requested segment; a requested segment with no rows is an error naming it.

    Returns:
        {segment: row count} for the requested segments, in the order given.
    """
    if schema.segment is None:
        raise ValueError(f"{name}: the schema has no segment column, so segments {list(segments)} cannot be selected")
    counts = canonical_text(frame[schema.segment]).value_counts()
    requested = [str(s) for s in segments]
    empty = [s for s in requested if counts.get(s, 0) == 0]
    if empty:
        raise ValueError(
            f"{name}: column {schema.segment!r} has no rows for segment(s) {empty}; "
            f"rows per segment: {counts.sort_index().to_dict()}"
        )
    return {s: int(counts[s]) for s in requested}
