"""One entry point for every data format the ``recpeft`` command reads.

``load_source(path, fmt, roles)`` returns ``(frame, schema)``:

- ``shop``: the embedded synthetic shop (``path`` ignored; see data/README.md).
- ``interactions``: a CSV / Parquet interaction log; ``roles`` name its columns and say how to read
  its times (``date_format``, ``time_unit``).
- ``movielens``: an ML-100K or ML-1M folder; segments from a user attribute (``segment_by``).
- ``criteo``: Criteo's TSV click log. It has no timestamp column, but its lines are in time
  order, so the line number becomes the time (``_line``) and the time split keeps its order.
- ``auto``: ``movielens`` for a folder holding ``u.data`` or ``ratings.dat``, ``criteo`` for
  ``.tsv`` / ``.tsv.gz`` / ``.txt``, otherwise ``interactions``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .criteo import load_criteo
from .formats import FORMATS
from .interactions import load_interactions
from .movielens import load_movielens
from .schema import Schema


@dataclass
class Roles:
    """Column roles for the ``interactions`` format, and format options."""

    user: str | None = "user"
    item: str | None = "item"
    label: str = "label"
    segment: str | None = "segment"
    timestamp: str | None = "timestamp"
    categorical: tuple[str, ...] = ()
    dense: tuple[str, ...] = ()
    segment_by: str = "gender"  # movielens: gender | age | occupation
    criteo_segment: str | None = None  # criteo: a C column naming segments
    #: interactions: strftime pattern of the timestamp strings (e.g. "%d/%m/%Y"); None: ISO 8601
    #: and other unambiguous forms only (see ``interactions.parse_timestamps``)
    date_format: str | None = None
    #: interactions: unit of epoch-number timestamps, "s" | "ms" | "us" | "ns"; None: by magnitude
    time_unit: str | None = None

    def schema(self) -> Schema:
        return Schema(
            user=self.user,
            item=self.item,
            label=self.label,
            segment=self.segment,
            timestamp=self.timestamp,
            categorical=tuple(self.categorical),
            dense=tuple(self.dense),
        )


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "u.data").is_file() or (path / "ratings.dat").is_file():
            return "movielens"
        raise ValueError(
            f"{path} is a folder but not a MovieLens one (no u.data or ratings.dat); "
            "pass an interaction file (CSV/Parquet) or --format"
        )
    name = path.name.lower()
    if name.endswith((".tsv", ".tsv.gz", ".txt", ".txt.gz")):
        return "criteo"
    return "interactions"


def resolve_format(path: str | Path | None, fmt: str = "auto") -> str:
    """The format ``load_source`` reads ``path`` in: ``fmt`` itself, or for ``auto`` the one the
    path shows (``shop`` when there is no path)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown data format {fmt!r}; choose one of {FORMATS}")
    if fmt != "auto":
        return fmt
    if path is None:
        return "shop"
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    return detect_format(Path(path))


def load_source(path: str | Path | None, fmt: str = "auto", roles: Roles | None = None) -> tuple[pd.DataFrame, Schema]:
    """``(frame, schema)`` of the data at ``path`` in format ``fmt`` (see the module docstring)."""
    roles = roles or Roles()
    fmt = resolve_format(path, fmt)
    if fmt == "shop":
        from .synthetic import SHOP_SCHEMA, load_shop

        return load_shop(), SHOP_SCHEMA
    if path is None:
        raise ValueError(f"format {fmt!r} needs a data path")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if fmt == "movielens":
        return load_movielens(path, segment_by=roles.segment_by)
    if fmt == "criteo":
        frame, schema = load_criteo(path, segment=roles.criteo_segment)
        frame["_line"] = pd.to_datetime(pd.RangeIndex(len(frame)), unit="s")
        return frame, Schema(**{**schema.to_dict(), "timestamp": "_line"})
    schema = roles.schema()
    return load_interactions(path, schema, date_format=roles.date_format, time_unit=roles.time_unit), schema
