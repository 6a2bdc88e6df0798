"""ClickBatches: encoded interactions as mini-batches for torchrec click models (DLRM, DCN).

Batch of B rows with F sparse features and n_dense dense columns:

- ``args[0]``: dense float32 [B, max(1, n_dense)] (one constant-zero column when there are no
  dense features, since DLRM's bottom MLP needs an input);
- ``args[1]``: a ``KeyedJaggedTensor`` with keys = the schema's sparse features in order, one id
  per bag: lengths = 1 everywhere, values [F·B] laid out key-major (all B ids of key 0, then key 1 …);
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
from .encoding import EncodedInteractions


class ClickBatches:
    """A ``BatchSource`` over ``encoded`` (N rows).

    Args:
        encoded: the rows, with labels.
        route: segment name → adapter index (≥ 0), or None for no routing. Names must be segments
            the encoder knows; rows of unmapped or unknown segments get −1.
        new_id_share: for pretraining, the share of (row, feature) ids replaced by the feature's
            new-id row ``new_ids[feature]`` (its out-of-vocabulary id), fixed per row by ``seed``
            (:meth:`_as_new_ids`); 0 (default) for none.
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
        self._ids = torch.stack([encoded.sparse[k] for k in self.keys]) if self.keys else None  # [F, N]
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
        ids = self._ids[:, index]  # [F, B]
        if self.new_id_share:
            ids = self._as_new_ids(ids, index)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=ids.reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
        )
        kwargs = {} if self._adapter_ids is None else {"adapter_ids": self._adapter_ids[index]}
        return Batch((self._dense[index], kjt), self.encoded.labels[index], kwargs)

    def _as_new_ids(self, ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``ids`` [F, B] with a fixed share of (row, feature) pairs replaced by that feature's
        new-id row (its out-of-vocabulary id): pair (i, f) is replaced when a hash of (i, f, seed)
        falls below ``new_id_share`` — the same pairs in every epoch and after a resume, about
        ``new_id_share`` of all of them. Pretraining on this teaches the new-id row what an id
        the model has not seen looks like, instead of leaving it at its random start."""
        features = torch.arange(ids.shape[0], dtype=torch.int64).unsqueeze(1)
        x = index.unsqueeze(0) * 1_000_003 + features * 7_919 + self.seed * 104_729
        for _ in range(2):  # a multiply-xorshift mix (int64 arithmetic wraps)
            x = (x * 6_364_136_223_846_793_005 + 1_442_695_040_888_963_407) & 0x7FFF_FFFF_FFFF_FFFF
            x = x ^ (x >> 29)
        chosen = (x & 0xFF_FFFF).to(torch.float64) / 2**24 < self.new_id_share
        new = torch.tensor([self.new_ids[k] for k in self.keys], dtype=ids.dtype).unsqueeze(1).expand_as(ids)
        return torch.where(chosen, new, ids)

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
