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

Feature columns (``roles.categorical``, ``roles.dense``: ``--categorical`` / ``--dense``), the
same rule for every format. ``interactions``: the columns named, none when none are named
(``roles.bags``: which of the categorical ones hold bags ``"A|B"``). The other formats offer
fixed columns (:func:`offered_features`): none named → all the format gives by default
(``movielens``: its user attributes and the genre bag); some named → exactly those, each of which
the format must offer, else a one-line ValueError naming the flag, the format and what it offers
(``movielens`` offers no dense column). A format's bag columns stay bags; ``roles.bags`` may only
repeat them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from .criteo import CATEGORICAL as CRITEO_CATEGORICAL
from .criteo import DENSE as CRITEO_DENSE
from .criteo import load_criteo
from .formats import FORMATS, MOVIELENS_DEFAULT_FEATURES, MOVIELENS_FEATURES
from .interactions import load_interactions
from .movielens import BAG_FEATURES as MOVIELENS_BAGS
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
    #: the categorical columns holding bags of ids ("A|B"; see ``Schema.bags``)
    bags: tuple[str, ...] = ()
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
            bags=tuple(self.bags),
        )


@dataclass(frozen=True)
class FeatureOffer:
    """The feature columns a fixed-layout format gives: those it can give (``categorical``,
    ``dense``), those it gives when none are named (``default_*``) and its bag columns."""

    categorical: tuple[str, ...]
    dense: tuple[str, ...]
    default_categorical: tuple[str, ...]
    default_dense: tuple[str, ...]
    bags: tuple[str, ...] = ()


def offered_features(fmt: str) -> FeatureOffer | None:
    """What format ``fmt`` (resolved, not ``auto``) offers; None for ``interactions``, whose
    columns are the file's."""
    if fmt == "shop":
        from .synthetic import SHOP_SCHEMA

        cats, dense = SHOP_SCHEMA.categorical, SHOP_SCHEMA.dense
        return FeatureOffer(cats, dense, cats, dense)
    if fmt == "movielens":
        return FeatureOffer(MOVIELENS_FEATURES, (), MOVIELENS_DEFAULT_FEATURES, (), MOVIELENS_BAGS)
    if fmt == "criteo":
        return FeatureOffer(CRITEO_CATEGORICAL, CRITEO_DENSE, CRITEO_CATEGORICAL, CRITEO_DENSE)
    return None


def _named(fmt: str, flag: str, given, offered: tuple[str, ...], default: tuple[str, ...]) -> tuple[str, ...]:
    """``given`` columns, each offered by ``fmt``; ``default`` when none are given."""
    given = tuple(given)
    if not given:
        return default
    wrong = [c for c in given if c not in offered]
    if wrong and not offered:
        raise ValueError(f"{flag} {','.join(given)}: the {fmt} format has no such columns; leave {flag} out")
    if wrong:
        raise ValueError(
            f"{flag} {','.join(given)}: the {fmt} format has no column(s) {wrong}; it offers {list(offered)}"
        )
    return given


def choose_features(fmt: str, roles: Roles) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None:
    """(categorical, dense, bags) that format ``fmt`` gives under ``roles`` (the rule of the
    module docstring), or None for ``interactions`` (``roles.schema()`` says). ValueError for a
    column the format does not offer."""
    offer = offered_features(fmt)
    if offer is None:
        return None
    categorical = _named(fmt, "--categorical", roles.categorical, offer.categorical, offer.default_categorical)
    dense = _named(fmt, "--dense", roles.dense, offer.dense, offer.default_dense)
    bags = tuple(c for c in offer.bags if c in categorical)
    _named(fmt, "Roles.bags", roles.bags, bags, bags)
    return categorical, dense, bags


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
    features = choose_features(fmt, roles)
    if fmt == "shop":
        from .synthetic import SHOP_SCHEMA, load_shop

        return load_shop(), _with_features(SHOP_SCHEMA, features)
    if path is None:
        raise ValueError(f"format {fmt!r} needs a data path")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    if fmt == "movielens":
        return load_movielens(path, segment_by=roles.segment_by, features=features[0])
    if fmt == "criteo":
        frame, schema = load_criteo(path, segment=roles.criteo_segment)
        frame["_line"] = pd.to_datetime(pd.RangeIndex(len(frame)), unit="s")
        return frame, replace(_with_features(schema, features), timestamp="_line")
    schema = roles.schema()
    return load_interactions(path, schema, date_format=roles.date_format, time_unit=roles.time_unit), schema


def _with_features(schema: Schema, features: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]) -> Schema:
    categorical, dense, bags = features
    return replace(schema, categorical=categorical, dense=dense, bags=bags)
