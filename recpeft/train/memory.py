"""The bytes a training run holds for its model and optimizers (:func:`training_state_bytes`),
the figure :class:`~recpeft.train.config.FitReport` and ``recpeft bench`` report."""

from __future__ import annotations

from torch import nn

from recpeft.utils.tensor_bytes import storage_bytes


def training_state_bytes(model: nn.Module, optimizers) -> int:
    """Bytes of the training state: every parameter of ``model`` (trainable and frozen), every
    parameter's ``.grad`` (a sparse one as its indices plus values), and every tensor in the
    optimizers' state (AdamW/LoraAdamW: exp_avg, exp_avg_sq, step). Each storage counts once,
    whole (a view counts its full storage). Not counted: buffers, activations, input batches,
    the allocator's slack — it estimates the state the optimizer choice decides, not a peak."""
    seen: set = set()
    params = list(model.parameters())
    total = storage_bytes(params, seen)
    total += storage_bytes([p.grad for p in params if p.grad is not None], seen)
    for optimizer in optimizers:
        for state in optimizer.state.values():
            total += storage_bytes(state.values(), seen)
    return total
