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
    """

    def __init__(self, encoded: EncodedInteractions, *, route: dict[str, int] | None = None):
        if encoded.labels is None:
            raise ValueError("ClickBatches: the encoded rows have no labels (the table had no label column)")
        self.encoded, self.route = encoded, route
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
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=self.keys, values=ids.reshape(-1), lengths=torch.ones(ids.numel(), dtype=torch.int32)
        )
        kwargs = {} if self._adapter_ids is None else {"adapter_ids": self._adapter_ids[index]}
        return Batch((self._dense[index], kjt), self.encoded.labels[index], kwargs)

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
        return ClickBatches(self.encoded.select(rows), route=self.route)
