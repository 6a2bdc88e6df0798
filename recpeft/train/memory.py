"""The bytes a training run holds for its model and optimizers (:func:`training_state_bytes`),
the figure :class:`~recpeft.train.config.FitReport` and ``recpeft bench`` report."""

from __future__ import annotations

import torch
from torch import nn


def _storage_bytes(tensors, seen: set) -> int:
    """Σ nbytes of the storages behind ``tensors`` (a sparse tensor: its indices and values) not
    yet in ``seen`` (keys (data_ptr, device), updated in place)."""
    total = 0
    for t in tensors:
        parts = (t._indices(), t._values()) if t.is_sparse else (t,)
        for part in parts:
            storage = part.untyped_storage()
            key = (storage.data_ptr(), part.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total


def training_state_bytes(model: nn.Module, optimizers) -> int:
    """Bytes of the training state: every parameter of ``model`` (trainable and frozen), every
    parameter's ``.grad`` (a sparse one as its indices plus values), and every tensor in the
    optimizers' state (AdamW/LoraAdamW: exp_avg, exp_avg_sq, step). Each storage counts once,
    whole (a view counts its full storage). Not counted: buffers, activations, input batches,
    the allocator's slack — it estimates the state the optimizer choice decides, not a peak."""
    seen: set = set()
    params = list(model.parameters())
    total = _storage_bytes(params, seen)
    total += _storage_bytes([p.grad for p in params if p.grad is not None], seen)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            total += _storage_bytes([v for v in state.values() if isinstance(v, torch.Tensor)], seen)
    return total
