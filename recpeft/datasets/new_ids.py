"""Ids of an adapter's own for values its base's encoder never saw (a new market's customers).

A base's encoder maps value v of sparse feature f to id k < n_f when v is the k-th fitted value,
and every other value to the out-of-vocabulary id n_f: the table has V_f = n_f + 1 rows. An
adapter with new-id rows on f's table (:mod:`recpeft.layers.new_rows`) owns ids V_f … V_f + m_f − 1.
:class:`NewIds` names the values they stand for, u_0 < … < u_{m_f − 1} (the values of a segment's
training rows the encoder never saw, sorted as a vocabulary is), and :class:`NewIdEncoder` encodes

    id(v) = k            v = vocabulary_f[k]      (the base's ids, unchanged)
    id(v) = V_f + j      v = u_j                  (the adapter's own rows)
    id(v) = n_f          any other value          (the new-id row, as before)

Merging such an adapter makes a base whose vocabulary is the old one followed by u_0 … u_{m − 1}
(:meth:`NewIdEncoder.merged`): u_j gets id n_f + j and the out-of-vocabulary id moves to the end,
n_f + m_f, where every base keeps it; :func:`oov_last_order` permutes the merged table's rows to
match. Saved in an adapter's folder as JSON (:meth:`NewIds.to_json`).

Example::

    new = NewIds.unseen_in(base_encoder, segment_train_rows, ["customer"])   # {customer: [u_0, …]}
    encoder = NewIdEncoder(base_encoder, new)          # transform() gives u_j the id V + j
    merged_encoder = encoder.merged()                  # a base's encoder: u_j → n + j, unseen → n + m
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from recpeft.utils.validation import parse_json_object

from .encoding import FeatureEncoder, fitted_keys, sparse_values

FORMAT = "recpeft.NewIds"
VERSION = 1


@dataclass(frozen=True)
class NewIds:
    """``values``: sparse feature → the values of its new ids, in id order (u_j has id V_f + j);
    canonical keys of the encoder's kind for that feature (ints or strings)."""

    values: dict[str, list]

    @property
    def counts(self) -> dict[str, int]:
        """Feature → m_f, the number of new ids (features with none are left out)."""
        return {f: len(v) for f, v in self.values.items() if v}

    @classmethod
    def unseen_in(cls, encoder: FeatureEncoder, frame: pd.DataFrame, features: Iterable[str]) -> NewIds:
        """The values of ``features`` in ``frame``'s rows (the pieces of a bag feature's cells) that
        ``encoder`` never saw, each once, sorted; a value that cannot be of the fitted kind
        (``"0126"`` for an int vocabulary) stays unseen and gets no id."""
        values = {}
        for feature in features:
            keys = fitted_keys(encoder, sparse_values(encoder, frame, feature), feature).dropna()
            unseen = keys[pd.Index(encoder.vocabulary(feature)).get_indexer(keys) < 0]
            values[feature] = sorted(unseen.unique().tolist())
        return cls(values)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "values": self.values}) + "\n"

    @classmethod
    def from_json(cls, text: str, *, name: str = "new ids JSON") -> NewIds:
        data = parse_json_object(text, name)
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise ValueError(f"{name}: not a {FORMAT} version {VERSION} file")
        values = data.get("values")
        if not isinstance(values, dict) or not all(isinstance(v, list) for v in values.values()):
            raise ValueError(f"{name}: field 'values' must map features to lists of values")
        return cls({str(f): list(v) for f, v in values.items()})


class NewIdEncoder(FeatureEncoder):
    """``base``'s encoder that also gives every value of ``new_ids`` its adapter's id V_f + j (see
    the module docstring); ``cardinalities`` stay the base's V_f. It is not a base's encoder and
    is not saved; :meth:`merged` is. ``name`` (where ``new_ids`` came from) names it in errors."""

    def __init__(self, base: FeatureEncoder, new_ids: NewIds, *, name: str = "new ids"):
        super().__init__()
        self.__dict__.update(base.__dict__)  # the base's vocabularies, shared and never changed
        self.base, self.new_ids = base, new_ids
        self._new = {f: self._checked(f, v, name) for f, v in new_ids.values.items() if v}

    def _checked(self, feature: str, values: list, name: str) -> pd.Index:
        """``values`` as an index of the fitted kind: unique, none of them already in the vocabulary."""
        schema = self._check_fitted()
        if feature not in schema.sparse_features:
            raise ValueError(f"{name}: {feature!r} is not a sparse feature of the base ({schema.sparse_features})")
        kind = self._kinds[feature]
        if not all(isinstance(v, int) if kind == "int" else isinstance(v, str) for v in values):
            raise ValueError(f"{name}: feature {feature!r} needs {kind} values, as the base's vocabulary holds")
        index = pd.Index(values, dtype="int64" if kind == "int" else object)
        if not index.is_unique:
            raise ValueError(f"{name}: feature {feature!r} repeats new values")
        known = self._vocab[feature].get_indexer(index) >= 0
        if known.any():
            raise ValueError(f"{name}: feature {feature!r} value {values[int(np.flatnonzero(known)[0])]!r} "
                             "is already in the base's vocabulary")  # fmt: skip
        return index

    def _codes(self, values: pd.Series, feature: str) -> np.ndarray:
        keys = fitted_keys(self, values, feature)
        codes = self._vocab[feature].get_indexer(keys).astype(np.int64)
        new = self._new.get(feature)
        if new is not None:
            extra = new.get_indexer(keys)
            take = (codes < 0) & (extra >= 0)
            codes[take] = len(self._vocab[feature]) + 1 + extra[take]
        return codes

    def to_json(self) -> str:
        raise TypeError("NewIdEncoder: an adapter's new ids are not a base's vocabulary; save merged() instead")

    def merged(self) -> FeatureEncoder:
        """The encoder of the base with the adapter merged: each vocabulary of a feature with new
        ids is followed by them (u_j → n_f + j), so the unseen id is n_f + m_f, the last again."""
        merged = FeatureEncoder()
        merged.__dict__.update(self.base.__dict__)
        merged._vocab = {f: v.append(self._new[f]) if f in self._new else v for f, v in self._vocab.items()}
        return merged


def oov_last_order(vocabulary: int, new: int) -> torch.Tensor:
    """int64 [n + 1 + m]: the rows of a merged table (n fitted rows, the new-id row n, then the m
    new ids' rows) reordered so that the new ids come right after the fitted rows and the new-id
    row is last: [0 … n − 1, n + 1 … n + m, n], ``vocabulary`` = n, ``new`` = m."""
    fitted, rows = torch.arange(vocabulary), torch.arange(vocabulary + 1, vocabulary + 1 + new)
    return torch.cat([fitted, rows, torch.tensor([vocabulary])])
