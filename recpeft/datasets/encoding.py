"""FeatureEncoder: turn an interaction table into model-ready tensors, reproducibly.

Fitted on the pretraining data, saved beside the base checkpoint and loaded again for every
fine-tuning run, so a fine-tuned model looks up exactly the rows the base model learned.

Sparse feature f with fitted values v_0 < v_1 < ... < v_{n_f - 1}: value v_k → id k. Values are
keyed by their canonical text (``interactions.canonical_ids``), so a table read from CSV, Parquet or
a DataFrame maps to the same ids: a feature whose values are all integers (ints, integral floats,
decimal text such as ``"126"``) is an int vocabulary, sorted numerically; any other feature is a
string vocabulary (ints as their decimal text, strings verbatim), sorted as strings. ``"0126"``
is not ``126``: against an int vocabulary it is an unseen value. Id n_f is reserved for unseen values
("out of vocabulary"), so the feature's table needs ``cardinalities[f] = n_f + 1`` rows.

Bag features (``Schema.bags``): a cell is the text of several values joined by
``schema.BAG_SEPARATOR`` (``"Action|Comedy"``, empty pieces dropped). The vocabulary is that of
the pieces (the same int/str rule over all of them), each piece maps as above, and a row's ids
fill a row of an int64 [N, L] matrix, L the longest bag of the frame, padded with ``PAD`` (−1).

Dense column c with values x: z = (g(x) − μ_c) / σ_c, where g = log1p when the column is
log-transformed and the identity otherwise, and μ_c, σ_c are the mean and the population
standard deviation of g(x) over the fitting data (σ_c = 1 when the column is constant). With
``log1p="auto"`` a column is log-transformed when its values are all ≥ 0 and its sample skewness
exceeds ``HEAVY_TAIL_SKEW`` (prices, counts); ``"none"``, ``"all"`` or a list of columns choose
explicitly.

Segments: the sorted segment names; a row's segment code indexes ``segments`` (−1 for a segment
not seen in fitting, with ``unseen="oov"``).

Example::

    encoder = FeatureEncoder().fit(train, schema)
    encoded = encoder.transform(test, unseen="oov")      # EncodedInteractions
    encoder.save("base/encoder.json"); FeatureEncoder.load("base/encoder.json")
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recpeft.utils.atomic import atomic_write_text
from recpeft.utils.validation import parse_json_object

from .interactions import DECIMAL_ID, RowLocator, canonical_ids, canonical_text, parse_timestamps, shown
from .schema import BAG_SEPARATOR, Schema

HEAVY_TAIL_SKEW = 2.0  # skewness above which a nonnegative column is log1p-transformed ("auto")
PAD = -1  # fills a bag feature's row of ids after its last id
FORMAT = "recpeft.FeatureEncoder"
VERSION = 1


@dataclass
class EncodedInteractions:
    """N encoded rows.

    Attributes:
        schema: the column roles.
        sparse: feature name → int64 [N] ids in 0..cardinality−1, in ``schema.sparse_features`` order;
            a bag feature (``schema.bags``) → int64 [N, L] ids, each row padded with ``PAD``.
        dense: float32 [N, n_dense] standardized dense features (n_dense may be 0).
        labels: float32 [N] 0/1, or None when the table had no label column.
        segments: int64 [N] index into ``segment_names`` (−1: unknown segment), or None.
        segment_names: the encoder's segment vocabulary.
        timestamps: int64 [N] nanoseconds since the epoch, or None.
        rows: int64 [N] the rows' index labels in the frame that was encoded (for a frame from
            ``load_interactions``, split or not: the row of the loaded table, 0-based).
    """

    schema: Schema
    sparse: dict[str, torch.Tensor]
    dense: torch.Tensor
    labels: torch.Tensor | None
    segments: torch.Tensor | None
    segment_names: list[str]
    timestamps: torch.Tensor | None
    rows: torch.Tensor = field(default=None)

    def __post_init__(self):
        n = int(self.dense.shape[0])
        if self.rows is None:
            self.rows = torch.arange(n, dtype=torch.int64)
        named = [
            *(("sparse " + k, v) for k, v in self.sparse.items()),
            ("labels", self.labels),
            ("segments", self.segments),
            ("timestamps", self.timestamps),
            ("rows", self.rows),
        ]
        for what, tensor in named:
            if tensor is not None and int(tensor.shape[0]) != n:
                raise ValueError(f"EncodedInteractions: {what} has {tensor.shape[0]} rows, dense has {n}")

    def __len__(self) -> int:
        return int(self.dense.shape[0])

    def select(self, index: torch.Tensor) -> EncodedInteractions:
        """The rows ``index`` (int64 [M] positions or bool [N] mask), as a new object."""
        pick = lambda t: None if t is None else t[index]
        return replace(
            self,
            sparse={k: v[index] for k, v in self.sparse.items()},
            dense=self.dense[index],
            labels=pick(self.labels),
            segments=pick(self.segments),
            timestamps=pick(self.timestamps),
            rows=self.rows[index],
        )


def _canonical(values: pd.Series) -> tuple[str, pd.Series]:
    """("int", int64 values) for a column of integers (ints, integral floats, decimal text without
    leading zeros), else ("str", canonical strings): see ``interactions.canonical_ids``."""
    ids = canonical_ids(values)
    if pd.api.types.is_integer_dtype(ids):
        return "int", ids.astype("int64")
    return "str", ids


def _decimal_or_none(text):
    if isinstance(text, str) and DECIMAL_ID.fullmatch(text):
        number = int(text)
        if -(2**63) <= number < 2**63:
            return number
    return None


def _as_kind(values: pd.Series, kind: str) -> pd.Series:
    """Values as keys of the fitted type, through their canonical text: a value that cannot be one
    (``"0126"`` or ``"sku1"`` for an int vocabulary) becomes None, i.e. unseen."""
    if kind == "str":
        return canonical_text(values)
    if pd.api.types.is_integer_dtype(values) and not pd.api.types.is_bool_dtype(values):
        return values.astype("int64")  # exact, also beyond 2**53 (hashed ids)
    codes, uniques = pd.factorize(canonical_text(values), use_na_sentinel=True)
    numbers = pd.array([_decimal_or_none(t) for t in uniques] + [None], dtype="Int64")
    return pd.Series(numbers[codes], index=values.index)


def _split_bags(values: pd.Series) -> tuple[np.ndarray, list[list]]:
    """(codes int64 [N], bags): row i holds the pieces ``bags[codes[i]]``, computed once per
    distinct cell: its canonical text split at ``BAG_SEPARATOR``, empty pieces dropped. A
    missing cell is the bag ``[None]`` (one missing value)."""
    codes, texts = pd.factorize(canonical_text(values), use_na_sentinel=True)
    bags = [[piece for piece in text.split(BAG_SEPARATOR) if piece] for text in texts]
    if (codes < 0).any():
        codes = np.where(codes < 0, len(bags), codes)
        bags.append([None])
    return codes.astype(np.int64), bags


def _pieces(bags: list[list]) -> pd.Series:
    return pd.Series([piece for bag in bags for piece in bag], dtype=object)


def sparse_values(encoder: FeatureEncoder, frame: pd.DataFrame, feature: str) -> pd.Series:
    """The values of sparse feature ``feature`` in ``frame``: its column, or for a bag feature the
    pieces of every cell (a missing cell is one missing value)."""
    if feature in encoder.schema.bags:
        return _pieces(_split_bags(frame[feature])[1])
    return frame[feature]


def fitted_keys(encoder: FeatureEncoder, values: pd.Series, feature: str) -> pd.Series:
    """``values`` as keys of the kind ``encoder`` fitted for ``feature`` (None where a value
    cannot be one): what its vocabulary is looked up with."""
    return _as_kind(values, encoder._kinds[feature])


def _refuse_unseen(location: str, value: str, rows: int) -> None:
    raise ValueError(
        f"{location}: value {value} was not seen when the encoder was fitted ({rows} such rows); "
        "pass unseen='oov' to map unseen values to the reserved id"
    )


def _segment_text(values: pd.Series) -> pd.Series:
    """Segment names as the loader makes them: canonical text, surrounding spaces stripped."""
    return canonical_text(values).str.strip()


class FeatureEncoder:
    """Vocabularies, dense statistics and segment names fitted on one table (see the module docstring).

    Attributes (after ``fit`` or ``load``):
        schema: the column roles.
        cardinalities: {sparse feature: n_f + 1} rows each embedding table needs (incl. the oov id).
        segments: the segment names, sorted.
        dense_stats: {dense column: {"log1p": bool, "mean": μ, "std": σ}}.
    """

    def __init__(self):
        self.schema: Schema | None = None
        self._vocab: dict[str, pd.Index] = {}
        self._kinds: dict[str, str] = {}
        self.dense_stats: dict[str, dict] = {}
        self._segments: list[str] = []

    # -- fitting -----------------------------------------------------------------------------
    def fit(self, frame: pd.DataFrame, schema: Schema, *, log1p: str | Iterable[str] = "auto") -> FeatureEncoder:
        """Fit vocabularies, dense statistics and segments on ``frame`` (validated, e.g. by
        ``load_interactions``). ``log1p``: "auto", "none", "all" or the columns to log-transform."""
        missing = [c for c in schema.sparse_features + schema.dense if c not in frame.columns]
        if missing:
            raise ValueError(f"FeatureEncoder.fit: missing column(s) {missing}; available {list(frame.columns)}")
        if len(frame) == 0:
            raise ValueError("FeatureEncoder.fit: the frame has no rows")
        self.schema = schema
        for feature in schema.sparse_features:
            values = _pieces(_split_bags(frame[feature])[1]).dropna() if feature in schema.bags else frame[feature]
            kind, keys = _canonical(values)
            self._kinds[feature] = kind
            self._vocab[feature] = pd.Index(np.sort(keys.unique()))
        chosen = self._log1p_columns(frame, schema, log1p)
        for column in schema.dense:
            x = frame[column].to_numpy(dtype="float64")
            if column in chosen:
                x = np.log1p(x)
            std = float(x.std())
            self.dense_stats[column] = {
                "log1p": column in chosen,
                "mean": float(x.mean()),
                "std": std if std > 1e-12 else 1.0,
            }
        if schema.segment is not None:
            self._segments = sorted(_segment_text(frame[schema.segment]).unique().tolist())
        return self

    @staticmethod
    def _log1p_columns(frame: pd.DataFrame, schema: Schema, log1p) -> set[str]:
        if log1p == "none":
            return set()
        if log1p == "auto":
            return {c for c in schema.dense if frame[c].min() >= 0 and frame[c].skew() > HEAVY_TAIL_SKEW}
        chosen = set(schema.dense) if log1p == "all" else set(log1p if not isinstance(log1p, str) else [log1p])
        unknown = sorted(chosen - set(schema.dense))
        if unknown:
            raise ValueError(
                f"FeatureEncoder.fit: log1p names {unknown}, which are not dense columns {list(schema.dense)}"
            )
        negative = [c for c in sorted(chosen) if frame[c].min() < 0]
        if negative:
            raise ValueError(f"FeatureEncoder.fit: log1p needs values ≥ 0, but column(s) {negative} hold negatives")
        return chosen

    def _check_fitted(self) -> Schema:
        if self.schema is None:
            raise RuntimeError("FeatureEncoder: call fit() or load() first")
        return self.schema

    @property
    def cardinalities(self) -> dict[str, int]:
        self._check_fitted()
        return {f: len(v) + 1 for f, v in self._vocab.items()}

    @property
    def segments(self) -> list[str]:
        self._check_fitted()
        return list(self._segments)

    def vocabulary(self, feature: str) -> list:
        """The fitted values of ``feature``; value ``vocabulary(f)[k]`` has id k."""
        self._check_fitted()
        return self._vocab[feature].tolist()

    # -- transforming ------------------------------------------------------------------------
    def transform(self, frame: pd.DataFrame, unseen: str = "error", *, name: str = "DataFrame") -> EncodedInteractions:
        """Encode ``frame`` (N rows).

        Args:
            unseen: "error" — a value not in the vocabulary (or an unknown segment) raises an error
                naming the column, the value and the row; "oov" — it maps to the feature's reserved
                last id (segment: −1).
            name: how errors name the frame.
        Label, segment and timestamp columns are optional (their tensors are then None); sparse and
        dense columns are required.
        """
        schema = self._check_fitted()
        if unseen not in ("error", "oov"):
            raise ValueError(f"FeatureEncoder.transform: unseen must be 'error' or 'oov', got {unseen!r}")
        missing = [c for c in schema.sparse_features + schema.dense if c not in frame.columns]
        if missing:
            raise ValueError(f"{name}: missing column(s) {missing}; the available columns are {list(frame.columns)}")
        where = RowLocator(name, frame, is_file=False)
        sparse = {f: torch.from_numpy(self._encode_sparse(frame[f], f, unseen, where)) for f in schema.sparse_features}
        dense = np.zeros((len(frame), len(schema.dense)), dtype=np.float32)
        for j, column in enumerate(schema.dense):
            dense[:, j] = self._encode_dense(frame[column], column, where)
        labels = segments = timestamps = None
        if schema.label and schema.label in frame.columns:
            labels = torch.from_numpy(np.array(frame[schema.label], dtype=np.float32))
            bad = np.flatnonzero((labels != 0) & (labels != 1))
            if bad.size:
                raise ValueError(
                    f"{where.at(schema.label, int(bad[0]))}: the label must be 0 or 1, "
                    f"got {shown(frame[schema.label].iloc[bad[0]])}"
                )
        if schema.segment and schema.segment in frame.columns:
            segments = torch.from_numpy(self._encode_segments(frame[schema.segment], unseen, where))
        if schema.timestamp and schema.timestamp in frame.columns:
            column = schema.timestamp
            parsed = parse_timestamps(frame[column], lambda pos: where.at(column, pos))
            timestamps = torch.from_numpy(np.array(parsed.to_numpy().astype("int64")))
        rows = (
            frame.index.to_numpy(dtype="int64")
            if pd.api.types.is_integer_dtype(frame.index)
            else np.arange(len(frame), dtype=np.int64)
        )
        return EncodedInteractions(
            schema,
            sparse,
            torch.from_numpy(dense),
            labels,
            segments,
            self.segments,
            timestamps,
            torch.from_numpy(rows.copy()),
        )

    def _encode_sparse(self, values: pd.Series, feature: str, unseen: str, where: RowLocator) -> np.ndarray:
        if feature in self.schema.bags:
            return self._encode_bags(values, feature, unseen, where)
        codes = self._codes(values, feature)
        lost = codes < 0
        if lost.any() and unseen == "error":
            pos = int(np.flatnonzero(lost)[0])
            _refuse_unseen(where.at(feature, pos), shown(values.iloc[pos]), int(lost.sum()))
        codes[lost] = len(self._vocab[feature])
        return codes

    def _codes(self, values: pd.Series, feature: str) -> np.ndarray:
        """int64 id of each value, −1 where the vocabulary lacks it."""
        return self._vocab[feature].get_indexer(fitted_keys(self, values, feature)).astype(np.int64)

    def _encode_bags(self, values: pd.Series, feature: str, unseen: str, where: RowLocator) -> np.ndarray:
        """int64 [N, L] ids of bag feature ``feature``, rows padded with ``PAD``; computed per
        distinct cell."""
        codes, bags = _split_bags(values)
        sizes = np.array([len(bag) for bag in bags], dtype=np.int64)
        owner = np.repeat(np.arange(len(bags)), sizes)  # the distinct cell of each piece
        pieces = _pieces(bags)
        ids = self._codes(pieces, feature) if len(pieces) else np.zeros(0, dtype=np.int64)
        lost = ids < 0
        if lost.any() and unseen == "error":
            first = int(np.flatnonzero(lost)[0])
            rows = np.isin(codes, owner[lost])
            pos = int(np.flatnonzero(codes == owner[first])[0])
            _refuse_unseen(
                where.at(feature, pos),
                f"{shown(pieces.iloc[first])} (of the bag {shown(values.iloc[pos])})",
                int(rows.sum()),
            )
        ids[lost] = len(self._vocab[feature])
        table = np.full((len(bags), int(sizes.max(initial=0))), PAD, dtype=np.int64)
        table[owner, np.arange(len(ids)) - np.repeat(np.cumsum(sizes) - sizes, sizes)] = ids
        return table[codes]

    def _encode_dense(self, values: pd.Series, column: str, where: RowLocator) -> np.ndarray:
        stats = self.dense_stats[column]
        x = pd.to_numeric(values, errors="coerce").to_numpy(dtype="float64")
        bad = ~np.isfinite(x) | ((x < 0) if stats["log1p"] else False)
        if bad.any():
            pos = int(np.flatnonzero(bad)[0])
            need = "a finite number ≥ 0 (the column is log1p-transformed)" if stats["log1p"] else "a finite number"
            raise ValueError(f"{where.at(column, pos)}: dense value must be {need}, got {shown(values.iloc[pos])}")
        if stats["log1p"]:
            x = np.log1p(x)
        return (x - stats["mean"]) / stats["std"]

    def _encode_segments(self, values: pd.Series, unseen: str, where: RowLocator) -> np.ndarray:
        codes = pd.Index(self._segments).get_indexer(_segment_text(values))
        lost = codes < 0
        if lost.any() and unseen == "error":
            pos = int(np.flatnonzero(lost)[0])
            raise ValueError(
                f"{where.at(self.schema.segment, pos)}: segment {shown(values.iloc[pos])} was not seen "
                f"when the encoder was fitted (known: {self._segments})"
            )
        return codes.astype(np.int64)

    # -- saving ------------------------------------------------------------------------------
    def to_json(self) -> str:
        schema = self._check_fitted()
        sparse = {
            f: {
                "kind": self._kinds[f],
                "values": [int(v) if self._kinds[f] == "int" else str(v) for v in self._vocab[f]],
            }
            for f in schema.sparse_features
        }
        return json.dumps(
            {
                "format": FORMAT,
                "version": VERSION,
                "schema": schema.to_dict(),
                "sparse": sparse,
                "dense": self.dense_stats,
                "segments": self._segments,
            }
        )

    @classmethod
    def from_json(cls, text: str, *, name: str = "encoder JSON") -> FeatureEncoder:
        try:
            return cls._from_json(text, name)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{name}: malformed encoder file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def _from_json(cls, text: str, name: str) -> FeatureEncoder:
        data = parse_json_object(text, name)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{name}: not a {FORMAT} version {VERSION} file")
        schema = Schema.from_dict(data["schema"])
        encoder = cls()
        encoder.schema = schema
        if sorted(data["sparse"]) != sorted(schema.sparse_features) or sorted(data["dense"]) != sorted(schema.dense):
            raise ValueError(f"{name}: the vocabularies/dense statistics do not match the schema's features")
        for feature in schema.sparse_features:
            entry = data["sparse"][feature]
            if entry["kind"] not in ("int", "str"):
                raise ValueError(f"{name}: feature {feature!r} has unknown kind {entry['kind']!r}")
            vocab = pd.Index(entry["values"], dtype="int64" if entry["kind"] == "int" else object)
            if not vocab.is_unique:
                raise ValueError(f"{name}: feature {feature!r} repeats vocabulary values")
            encoder._kinds[feature], encoder._vocab[feature] = entry["kind"], vocab
        encoder.dense_stats = {c: dict(data["dense"][c]) for c in schema.dense}
        encoder._segments = [str(s) for s in data["segments"]]
        return encoder

    def save(self, path: str | Path) -> None:
        """Write ``to_json()`` to ``path`` atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> FeatureEncoder:
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such encoder file")
        return cls.from_json(path.read_text(), name=str(path))
