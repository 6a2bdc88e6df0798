"""Criteo's click-log TSV (Display Advertising Challenge / Terabyte format) as an interaction table.

Each line: 40 tab-separated fields, no header — label (0/1), I1..I13 (integer counts, possibly
empty), C1..C26 (32-bit hex hashes, possibly empty). Plain or ``.gz``.

Conventions (those of the DLRM reference preprocessing): an empty I field is 0, a negative one is
clipped to 0, so every dense value is a nonnegative float ready for log1p (``FeatureEncoder``'s
"auto" rule picks log1p for the heavy-tailed ones); an empty C field is the token "" (its own
vocabulary entry). There is no user, item, segment or time: the schema has ``user=None,
item=None`` and the 26 C columns as its sparse features; ``segment="C9"`` (any C column) copies
that column into a ``segment`` column to route adapters by it.

Example::

    frame, schema = load_criteo("day_0.gz", nrows=1_000_000, segment="C9")
"""

from __future__ import annotations

import csv
import gzip
import io
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from .interactions import validate_frame
from .schema import Schema

DENSE = tuple(f"I{i}" for i in range(1, 14))
CATEGORICAL = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = ("label",) + DENSE + CATEGORICAL


def _lines(path: Path, nrows: int | None, progress: bool) -> list[str]:
    """The first ``nrows`` lines (all when None), without line endings, each checked to hold 40 fields."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8", newline="") as handle:
            lines = [
                line.rstrip("\r\n")
                for line in tqdm(
                    islice(handle, nrows), total=nrows, disable=not progress, desc=f"reading {path.name}", unit=" lines"
                )
            ]
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); is it binary?") from None
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile, a truncated .gz
        raise ValueError(f"{path}: cannot read the file: {exc}") from None
    if not lines:
        raise ValueError(f"{path}: the file is empty")
    fields = pd.Series(lines, dtype=object).str.count("\t").to_numpy() + 1
    bad = np.flatnonzero(fields != len(COLUMNS))
    if bad.size:
        raise ValueError(
            f"{path}, line {bad[0] + 1}: expected {len(COLUMNS)} tab-separated fields "
            f"(label, I1..I13, C1..C26), found {fields[bad[0]]}"
        )
    return lines


def load_criteo(
    path: str | Path, *, nrows: int | None = None, segment: str | None = None, progress: bool = False
) -> tuple[pd.DataFrame, Schema]:
    """Read a Criteo TSV file.

    Args:
        path: the file (``.gz`` read compressed).
        nrows: read only the first nrows lines.
        segment: a C column whose values name segments, or None.
        progress: show a tqdm bar while reading.

    Returns:
        (frame, schema): N rows; label float32, I1..I13 float64 ≥ 0, C1..C26 strings, and
        ``segment`` (strings) when asked for.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if nrows is not None and nrows < 1:
        raise ValueError(f"load_criteo: nrows must be ≥ 1, got {nrows}")
    if segment is not None and segment not in CATEGORICAL:
        raise ValueError(f"load_criteo: segment must be one of C1..C26, got {segment!r}")
    lines = _lines(path, nrows, progress)
    raw = pd.read_csv(
        io.StringIO("\n".join(lines)),
        sep="\t",
        header=None,
        names=list(COLUMNS),
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
    )
    frame = pd.DataFrame({"label": raw["label"]})
    bad = np.flatnonzero(~raw["label"].isin(["0", "1"]).to_numpy())
    if bad.size:
        raise ValueError(f"{path}, line {bad[0] + 1}: column 'label' must be 0 or 1, got {raw['label'].iloc[bad[0]]!r}")
    frame["label"] = raw["label"].astype("float32")
    for column in DENSE:
        text = raw[column].str.strip()
        numbers = pd.to_numeric(text.where(text != "", "0"), errors="coerce").to_numpy(dtype="float64")
        bad = np.flatnonzero(~np.isfinite(numbers) | (numbers != np.round(numbers)))
        if bad.size:
            raise ValueError(
                f"{path}, line {bad[0] + 1}: column {column!r} must be an integer or empty, "
                f"got {raw[column].iloc[bad[0]]!r}"
            )
        frame[column] = np.maximum(numbers, 0.0)
    for column in CATEGORICAL:
        frame[column] = raw[column]
    if segment is not None:
        frame["segment"] = raw[segment]
    schema = Schema(
        user=None,
        item=None,
        label="label",
        segment="segment" if segment else None,
        timestamp=None,
        categorical=CATEGORICAL,
        dense=DENSE,
    )
    return validate_frame(frame, schema, str(path)), schema
