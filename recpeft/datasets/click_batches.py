"""ClickBatches: encoded interactions as mini-batches for torchrec click models (DLRM, DCN).

Batch of B rows with F sparse features and n_dense dense columns:

- ``args[0]``: dense float32 [B, max(1, n_dense)] (one constant-zero column when there are no
  dense features, since DLRM's bottom MLP needs an input);
- ``args[1]``: a ``KeyedJaggedTensor`` with keys = the schema's sparse features in order, values
  laid out key-major (all ids of key 0, row by row, then key 1 …): one id per row (length 1) for
  single-id features; for a bag feature (``Schema.bags``) a row's ids, length = their number
  (0 for an empty bag, whose pooled vector is zero). Without bags lengths = 1 everywhere and
  values has F·B ids;
- ``labels``: float32 [B];
- ``kwargs["adapter_ids"]``: int64 [B], only when ``route`` is given: ``route[segment]`` for each
  row's segment, −1 (the base model) for segments the route does not map.

Example::

    source = ClickBatches(encoder.transform(train), route={"DE": 0, "FR": 1})
    batch = source.batch(torch.arange(256))
    logits = model(*batch.args, **batch.kwargs)
    de_only = source.subset("DE")
"""

from __future__ import annotations

import torch

from .batch import Batch
from .encoding import PAD, EncodedInteractions


class ClickBatches:
    """A ``BatchSource`` over ``encoded`` (N rows).

    Args:
        encoded: the rows, with labels.
        route: segment name → adapter index (≥ 0), or None for no routing. Names must be segments
            the encoder knows; rows of unmapped or unknown segments get −1.
        new_id_share: for pretraining, the share of (row, feature) ids replaced by the feature's
            new-id row ``new_ids[feature]`` (its out-of-vocabulary id), fixed per row by ``seed``
            (:meth:`_new_id_pairs`; a bag so chosen becomes the bag of that one id); 0 (default)
            for none.
    """

    def __init__(
        self,
        encoded: EncodedInteractions,
        *,
        route: dict[str, int] | None = None,
        new_id_share: float = 0.0,
        new_ids: dict[str, int] | None = None,
        seed: int = 0,
    ):
        if encoded.labels is None:
            raise ValueError("ClickBatches: the encoded rows have no labels (the table had no label column)")
        if not 0.0 <= new_id_share < 1.0:
            raise ValueError(f"ClickBatches: new_id_share must be in [0, 1), got {new_id_share!r}")
        if new_id_share and set(new_ids or {}) != set(encoded.sparse):
            raise ValueError(f"ClickBatches: new_ids must give the new-id row of every feature {list(encoded.sparse)}")
        self.encoded, self.route = encoded, route
        self.new_id_share, self.new_ids, self.seed = new_id_share, new_ids, seed
        self.keys = list(encoded.sparse)
        self._bags = {k: v for k, v in encoded.sparse.items() if v.dim() == 2}  # bag features: [N, L]
        self._singles = [k for k in self.keys if k not in self._bags]
        self._ids = torch.stack([encoded.sparse[k] for k in self._singles]) if self._singles else None  # [F1, N]
        dense = encoded.dense
        self._dense = dense if dense.shape[1] > 0 else torch.zeros(len(encoded), 1, dtype=torch.float32)
        self._adapter_ids = None if route is None else self._route_rows(encoded, route)

    @staticmethod
    def _route_rows(encoded: EncodedInteractions, route: dict[str, int]) -> torch.Tensor:
        """adapter id per row: int64 [N]."""
        if encoded.segments is None:
            raise ValueError("ClickBatches: route given but the encoded rows have no segment column")
        names = encoded.segment_names
        unknown = sorted(set(route) - set(names))
        if unknown:
            raise ValueError(f"ClickBatches: route names unknown segment(s) {unknown}; known segments: {names}")
        bad = {k: v for k, v in route.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"ClickBatches: route values must be adapter indices ≥ 0, got {bad}")
        table = torch.full((len(names) + 1,), -1, dtype=torch.int64)  # last slot: unknown segment (code −1)
        for name, adapter in route.items():
            table[names.index(name)] = adapter
        return table[encoded.segments]  # code −1 reads the last slot

    def __len__(self) -> int:
        return len(self.encoded)

    @property
    def num_dense(self) -> int:
        """Width of the dense input, max(1, n_dense)."""
        return int(self._dense.shape[1])

    def batch(self, index: torch.Tensor) -> Batch:
        """Rows ``index`` (int64 [B]) as a ``Batch`` (see the module docstring)."""
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # here: torchrec takes seconds to import

        index = torch.as_tensor(index, dtype=torch.int64)
        ids = self._ids[:, index] if self._ids is not None else None  # [F1, B]
        if self.new_id_share and ids is not None:
            chosen = self._new_id_pairs(index, [self.keys.index(k) for k in self._singles])
            new = torch.tensor([self.new_ids[k] for k in self._singles], dtype=ids.dtype).unsqueeze(1)
            ids = torch.where(chosen, new.expand_as(ids), ids)
        if not self._bags:
            values, lengths = ids.reshape(-1), torch.ones(ids.numel(), dtype=torch.int32)
        else:
            values, lengths = self._jagged(ids, index)
        kjt = KeyedJaggedTensor.from_lengths_sync(keys=self.keys, values=values, lengths=lengths)
        kwargs = {} if self._adapter_ids is None else {"adapter_ids": self._adapter_ids[index]}
        return Batch((self._dense[index], kjt), self.encoded.labels[index], kwargs)

    def _jagged(self, ids: torch.Tensor | None, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, lengths int32 [F·B]) of the rows ``index``, key-major: single-id features from
        ``ids`` [F1, B], bag features their rows' ids without the padding (a bag chosen by
        :meth:`_new_id_pairs` becomes the one new id)."""
        parts, sizes = [], []
        for key in self.keys:
            if key not in self._bags:
                row = ids[self._singles.index(key)]
                parts.append(row)
                sizes.append(torch.ones(len(index), dtype=torch.int32))
                continue
            bag = self._bags[key][index]  # [B, L]
            if self.new_id_share:
                chosen = self._new_id_pairs(index, [self.keys.index(key)])[0]
                bag = torch.cat([bag, torch.full((len(index), 1), PAD, dtype=bag.dtype)], dim=1)
                alone = torch.full_like(bag, PAD)
                alone[:, 0] = self.new_ids[key]
                bag = torch.where(chosen.unsqueeze(1), alone, bag)
            kept = bag != PAD
            parts.append(bag[kept])  # row-major: row 0's ids, then row 1's …
            sizes.append(kept.sum(dim=1, dtype=torch.int32))
        return torch.cat(parts), torch.cat(sizes)

    def _new_id_pairs(self, index: torch.Tensor, features: list[int]) -> torch.Tensor:
        """bool [len(features), B]: the (row, feature) pairs fed as that feature's new-id row
        (its out-of-vocabulary id), for the rows ``index`` and the features at positions
        ``features`` of ``keys``. Pair (i, f) is chosen when a hash of (i, f, seed) falls below
        ``new_id_share`` — the same pairs in every epoch and after a resume, about
        ``new_id_share`` of all of them. Pretraining on this teaches the new-id row what an id
        the model has not seen looks like, instead of leaving it at its random start."""
        positions = torch.tensor(features, dtype=torch.int64).unsqueeze(1)
        x = index.unsqueeze(0) * 1_000_003 + positions * 7_919 + self.seed * 104_729
        for _ in range(2):  # a multiply-xorshift mix (int64 arithmetic wraps)
            x = (x * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) & 0x7FFF_FFFF_FFFF_FFFF
            x = x ^ (x >> 29)
        return (x & 0xFF_FFFF).to(torch.float64) / 2**24 < self.new_id_share

    def subset(self, rows: str | torch.Tensor) -> ClickBatches:
        """A ClickBatches over some rows: a segment name, a bool mask [N] or int64 positions [M]."""
        if isinstance(rows, str):
            names = self.encoded.segment_names
            if self.encoded.segments is None or rows not in names:
                raise ValueError(f"ClickBatches.subset: unknown segment {rows!r}; known segments: {names}")
            rows = self.encoded.segments == names.index(rows)
        rows = torch.as_tensor(rows)
        if rows.dtype == torch.bool and rows.shape != (len(self),):
            raise ValueError(f"ClickBatches.subset: mask has shape {tuple(rows.shape)}, need ({len(self)},)")
        return ClickBatches(
            self.encoded.select(rows),
            route=self.route,
            new_id_share=self.new_id_share,
            new_ids=self.new_ids,
            seed=self.seed,
        )
