"""What the Trainer and the evaluators consume: a source of rows that hands out mini-batches.

A ``BatchSource`` holds N rows; ``source.batch(index)`` returns the rows ``index`` (int64 [B]) as a
``Batch``: the model is called as ``model(*batch.args, **batch.kwargs)`` and its output compared
with ``batch.labels``. Sources for tensors (``TensorBatches``) live here; sources that build
torchrec ``KeyedJaggedTensor`` batches from interaction tables live in ``recpeft.datasets``.

Example::

    source = TensorBatches(user_ids, item_ids, labels=clicks)
    batch = source.batch(torch.arange(4))
    logits = model(*batch.args, **batch.kwargs)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from recpeft.utils.devices import to_device
from recpeft.utils.validation import first_non_finite


def _move(value: Any, device: torch.device | str) -> Any:
    """Tensors and objects with ``.to`` (KeyedJaggedTensor) go to ``device`` (pinned, without
    blocking, from the CPU to CUDA: :func:`recpeft.utils.devices.to_device`); the rest stay."""
    return to_device(value, torch.device(device))


@dataclass
class Batch:
    """Model inputs ``args``/``kwargs`` and the targets ``labels`` [B] of B rows."""

    args: tuple
    labels: torch.Tensor
    kwargs: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            tuple(_move(a, device) for a in self.args),
            _move(self.labels, device),
            {k: _move(v, device) for k, v in self.kwargs.items()},
        )


@runtime_checkable
class BatchSource(Protocol):
    """N rows; ``batch(index)`` returns the rows at ``index`` (int64 [B], any order)."""

    def __len__(self) -> int: ...

    def batch(self, index: torch.Tensor) -> Batch: ...


class TensorBatches:
    """Rows of equally long tensors: ``features`` become ``Batch.args``, ``kwargs`` tensors become
    ``Batch.kwargs`` (e.g. ``adapter_ids``), all indexed by the same rows.

    Args:
        *features: tensors [N, ...].
        labels: tensor [N].
        **kwargs: tensors [N, ...] passed to the model by keyword.
    """

    def __init__(self, *features: torch.Tensor, labels: torch.Tensor, **kwargs: torch.Tensor):
        rows = int(labels.shape[0])
        named = {**{f"feature {i}": f for i, f in enumerate(features)}, **kwargs}
        for name, tensor in named.items():
            if tensor.shape[0] != rows:
                raise ValueError(f"{name} has {tensor.shape[0]} rows but labels have {rows}")
        bad = first_non_finite(named)
        if bad is not None:
            raise ValueError(f"{bad} holds non-finite values")
        self.features, self.labels, self.kwargs = tuple(features), labels, kwargs

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: torch.Tensor) -> Batch:
        return Batch(
            tuple(f[index] for f in self.features), self.labels[index], {k: v[index] for k, v in self.kwargs.items()}
        )
