"""How many bytes tensors hold, counted one way everywhere recpeft reports memory: a dense
tensor its elements, a sparse (COO) tensor its indices plus its values, a torchrec /
torch.distributed ``ShardedTensor`` the shards this process holds.

    tensor_bytes(p.grad)                         # numel · element_size of every part
    storage_bytes([*params, *grads], seen=set()) # Σ bytes of the distinct storages behind them

Torch is imported inside the functions, as in :mod:`recpeft.utils.validation`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from functools import lru_cache


@lru_cache(maxsize=1)
def _sharded_tensor_type() -> type | None:
    import torch.distributed

    if not torch.distributed.is_available():
        return None
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return ShardedTensor


def _parts(value) -> Iterator:
    """The dense tensors that hold ``value``'s data: a sparse tensor's indices and values, a
    ShardedTensor's local shards (each taken apart in turn), a dense tensor itself; nothing for
    anything that is not a tensor (an optimizer's int step, None)."""
    import torch

    sharded = _sharded_tensor_type()
    if sharded is not None and isinstance(value, sharded):  # a torch.Tensor subclass: test it first
        for shard in value.local_shards():
            yield from _parts(shard.tensor)
    elif isinstance(value, torch.Tensor):
        if value.is_sparse:
            yield value._indices()
            yield value._values()
        else:
            yield value


def tensor_bytes(value) -> int:
    """Bytes of ``value``'s elements (see the module docstring); 0 for a non-tensor. A view
    counts its own elements, not the storage behind it."""
    return sum(part.numel() * part.element_size() for part in _parts(value))


def storage_bytes(values: Iterable, seen: set | None = None) -> int:
    """Σ bytes of the storages behind ``values`` (taken apart as :func:`tensor_bytes` does), each
    storage counted once and whole (a view counts its full storage). ``seen`` holds the
    (data_ptr, device) keys of storages already counted and is updated in place, so that several
    calls sharing one set count a storage once over all of them."""
    seen = set() if seen is None else seen
    total = 0
    for value in values:
        for part in _parts(value):
            storage = part.untyped_storage()
            key = (storage.data_ptr(), part.device)
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
    return total
