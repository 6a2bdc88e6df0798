"""Loading a user's interaction log (DataFrame, CSV, CSV.gz or Parquet) and checking it.

``load_interactions`` keeps the schema's columns only, in the schema's order, and returns them
normalised:

=============  ==============================================================================
role           after loading
=============  ==============================================================================
user, item,    as read (ints or strings); a missing value is an error
categorical
label          float32 0.0 / 1.0 (from 0/1 numbers or booleans; anything else is an error)
dense          float64, finite (non-numeric, missing or infinite values are errors)
segment        strings (``str(value)``); a missing value is an error
timestamp      datetime64[ns]: parsed from datetimes, date strings, or numbers as epoch seconds
=============  ==============================================================================

Every error names the source (the file path, or ``name`` / "DataFrame"), the column and the first
bad row: for files the 1-based data row (row 1 is the first line after the header), for a
DataFrame its index label. The result has a fresh RangeIndex, so row i of it is data row i + 1.

Example::

    frame = load_interactions("log.parquet", Schema(segment="market", dense=("price",)))
    check_segments(frame, schema, ["DE", "FR"])
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

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


def _read_file(path: Path, schema: Schema) -> pd.DataFrame:
    """Read a CSV (optionally gzip) or Parquet file; empty and unreadable files are errors."""
    lower = path.name.lower()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if lower.endswith(CSV_SUFFIXES):
        try:
            return pd.read_csv(path)
        except pd.errors.EmptyDataError:
            raise ValueError(f"{path}: the file is empty (no header, no rows)") from None
        except (pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not a valid CSV file: {exc}") from None
    if lower.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            available = pq.read_schema(path).names
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{path}: not a valid Parquet file: {exc}") from None
        _check_columns(available, schema, str(path))
        return pd.read_parquet(path, columns=list(schema.columns))
    raise ValueError(f"{path}: unknown file type; use one of {CSV_SUFFIXES + PARQUET_SUFFIXES}")


def _check_columns(available: Iterable[str], schema: Schema, name: str) -> None:
    available = [str(c) for c in available]
    missing = [c for c in schema.columns if c not in available]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing}; the available columns are {available}")


def parse_timestamps(values: pd.Series) -> tuple[pd.Series, int | None]:
    """Timestamps as datetime64[ns] (timezone-aware values converted to naive UTC).

    Numbers are epoch seconds; strings are parsed by pandas (one inferred format first, then each
    remaining value on its own). Returns (parsed, position of the first missing or unparsable value
    or None).
    """
    if pd.api.types.is_datetime64_any_dtype(values):
        parsed = values
    elif pd.api.types.is_bool_dtype(values):
        return values, 0
    elif pd.api.types.is_numeric_dtype(values):
        numbers = values.astype("float64")
        finite = np.isfinite(numbers.to_numpy())
        parsed = pd.to_datetime(numbers.where(finite), unit="s")
    else:
        parsed = pd.to_datetime(values, errors="coerce")
        retry = parsed.isna() & values.notna()
        if retry.any():
            parsed[retry] = pd.to_datetime(values[retry], errors="coerce", format="mixed")
    if getattr(parsed.dt, "tz", None) is not None:
        parsed = parsed.dt.tz_convert("UTC").dt.tz_localize(None)
    parsed = parsed.astype("datetime64[ns]")
    return parsed, _first(parsed.isna())


def _clean_label(values: pd.Series, source: RowLocator, column: str) -> pd.Series:
    if pd.api.types.is_bool_dtype(values):
        return values.astype("float32")
    numbers = pd.to_numeric(values, errors="coerce") if not pd.api.types.is_numeric_dtype(values) else values
    bad = _first(~numbers.isin([0, 1]))
    if bad is not None:
        raise ValueError(
            f"{source.at(column, bad)}: the label must be 0 or 1 (or a boolean), got {shown(values.iloc[bad])}"
        )
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


def validate_frame(frame: pd.DataFrame, schema: Schema, name: str = "DataFrame", is_file: bool = False) -> pd.DataFrame:
    """Check and normalise ``frame`` as the module docstring says; returns a new frame."""
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
        out[column] = frame[column]
    if schema.segment:
        out[schema.segment] = frame[schema.segment].astype(str)
    if schema.label:
        out[schema.label] = _clean_label(frame[schema.label], source, schema.label)
    for column in schema.dense:
        out[column] = _clean_dense(frame[column], source, column)
    if schema.timestamp:
        parsed, bad = parse_timestamps(frame[schema.timestamp])
        if bad is not None:
            raise ValueError(
                f"{source.at(schema.timestamp, bad)}: cannot read the timestamp "
                f"{shown(frame[schema.timestamp].iloc[bad])} (use a date/time string, a datetime "
                "or epoch seconds)"
            )
        out[schema.timestamp] = parsed
    return pd.DataFrame({c: out[c].reset_index(drop=True) for c in schema.columns})


def load_interactions(source: pd.DataFrame | str | Path, schema: Schema, *, name: str | None = None) -> pd.DataFrame:
    """Read and validate an interaction table.

    Args:
        source: a DataFrame, or a path ending in ``.csv``, ``.csv.gz``, ``.parquet`` or ``.pq``.
        schema: the column roles.
        name: how errors name a DataFrame source (default "DataFrame"); files are named by path.

    Returns:
        A DataFrame with the schema's columns, normalised (see the module docstring), N rows.
    """
    if isinstance(source, pd.DataFrame):
        return validate_frame(source, schema, name or "DataFrame", is_file=False)
    if isinstance(source, (str, Path)):
        path = Path(source)
        return validate_frame(_read_file(path, schema), schema, str(path), is_file=True)
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
    counts = frame[schema.segment].astype(str).value_counts()
    requested = [str(s) for s in segments]
    empty = [s for s in requested if counts.get(s, 0) == 0]
    if empty:
        raise ValueError(
            f"{name}: column {schema.segment!r} has no rows for segment(s) {empty}; "
            f"rows per segment: {counts.sort_index().to_dict()}"
        )
    return {s: int(counts[s]) for s in requested}
