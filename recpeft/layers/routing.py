"""Per-sample adapter routing: which adapter each sample of the current forward uses.

``PeftModel.forward(batch, adapter_ids=ids)`` sets the routing for the duration of the call;
every LoRA layer reads it and maps its input's leading dimension to samples.
``ids[i]`` indexes ``PeftModel.adapter_names`` (the order adapters were added), −1 = base model.

With ``group_by_adapter=True`` the batch is sorted by adapter once before the model runs
(:func:`grouped_batch`): every layer then finds its rows grouped and works on slices of its input
and output in place, with nothing gathered or scattered per layer; the outputs are put back in
the caller's order.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from recpeft.kernels.reference import promised_generation


@dataclass(frozen=True)
class Routing:
    sample_adapter: torch.Tensor  # [B] int64 in [-1, len(adapter_names))
    adapter_names: tuple[str, ...]

    def row_adapter(self, layer_name: str, leading: int, rows_per_sample: int, device: torch.device) -> torch.Tensor:
        """Adapter index of every row when the layer's input has ``leading`` samples of
        ``rows_per_sample`` rows each; raises when the leading dimension is not the samples."""
        if leading != self.sample_adapter.numel():
            raise ValueError(
                f"{layer_name}: per-sample routing needs the input's leading dimension to be the "
                f"{self.sample_adapter.numel()} routed samples, but it is {leading}; route a batch "
                f"whose every layer keeps samples first, or merge one adapter instead"
            )
        ids = self.sample_adapter.to(device)
        return ids if rows_per_sample == 1 else ids.repeat_interleave(rows_per_sample)


class RoutedListCache:
    """One layer's routed list (its weights for every routed adapter name), kept between calls.

    ``get(routing, mode, key, build)`` returns the kept list while ``key()`` — the layer's
    description of its routed adapters: names, parameter objects, scales — is what it was when the
    list was built, else a new ``build()``. Inside :func:`~recpeft.kernels.reference.unchanged_factors`
    with a generation, a list built or checked under that same generation, routed names and
    ``mode`` is returned without calling ``key()``: at hundreds of adapters the key costs a
    Python pass over every adapter, per layer and per call."""

    __slots__ = ("key", "promised", "value")

    def __init__(self):
        self.key: Hashable | None = None
        self.promised: tuple | None = None
        self.value: Any = None

    def get(self, routing: Routing, mode: Hashable, key: Callable[[], Hashable], build: Callable[[], Any]):
        generation = promised_generation()
        promised = (generation, routing.adapter_names, mode)
        if generation is not None and promised == self.promised:
            return self.value
        current = key()
        if self.key is None or current != self.key:
            self.key, self.value = current, build()
        self.promised = promised
        return self.value


_CURRENT: ContextVar[Routing | None] = ContextVar("recpeft_routing", default=None)
#: how many :func:`routed` blocks are open in this process, in any thread or task: 0 means no
#: routing anywhere, which a compiled forward can read as a plain global (torch.compile cannot
#: trace ``ContextVar.get``, and guards on this value instead)
_OPEN_ROUTINGS = 0


def current_routing() -> Routing | None:
    """The routing of the current forward (the innermost :func:`routed` of this thread or task),
    or None. Under torch.compile with no routing open anywhere this is None without a graph
    break; with one open, the ContextVar is read (a graph break: routed calls run eagerly)."""
    if _OPEN_ROUTINGS == 0:
        return None
    return _CURRENT.get()


def check_adapter_ids(adapter_ids, adapter_names: tuple[str, ...]) -> torch.Tensor:
    """Validate ``adapter_ids`` (int tensor or sequence, [B]) and return it as int64."""
    ids = torch.as_tensor(adapter_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"adapter_ids must be integers, got {ids.dtype}")
    if ids.dim() != 1:
        raise ValueError(f"adapter_ids must be 1-D (one id per sample), got shape {tuple(ids.shape)}")
    ids = ids.to(torch.int64)
    if ids.numel():
        low, high = int(ids.min()), int(ids.max())
        if low < -1 or high >= len(adapter_names):
            bad = low if low < -1 else high
            raise IndexError(
                f"adapter id {bad} is out of range: use -1 (base model) or 0..{len(adapter_names) - 1} "
                f"for adapters {list(adapter_names)}"
            )
    return ids


@contextmanager
def routed(sample_adapter: torch.Tensor, adapter_names: tuple[str, ...]):
    """Route the forward calls inside the block: sample i through adapter ``sample_adapter[i]``."""
    global _OPEN_ROUTINGS
    token = _CURRENT.set(Routing(sample_adapter, adapter_names))
    _OPEN_ROUTINGS += 1  # under the GIL; the count only decides whether to read the ContextVar
    try:
        yield
    finally:
        _OPEN_ROUTINGS -= 1
        _CURRENT.reset(token)


#: inputs that carry samples but cannot be reordered row by row here (torchrec's jagged batches)
_UNORDERABLE = ("KeyedJaggedTensor", "JaggedTensor", "KeyedTensor")


def _map_tensors(fn: Callable, value):
    """``value`` with ``fn`` applied to every tensor inside lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)):
        mapped = [_map_tensors(fn, v) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else type(value)(mapped)
    if isinstance(value, dict):  # keyword construction keeps dict subclasses such as HF's ModelOutput
        mapped = {k: _map_tensors(fn, v) for k, v in value.items()}
        return type(value)(**mapped) if all(isinstance(k, str) for k in mapped) else type(value)(mapped)
    if type(value).__name__ in _UNORDERABLE:
        raise TypeError(
            f"group_by_adapter: a {type(value).__name__} input cannot be reordered by sample; "
            "route this model without group_by_adapter"
        )
    return value


def grouped_batch(args: tuple, kwargs: dict, sample_adapter: torch.Tensor):
    """(args, kwargs, sorted ids, restore): the call's per-sample tensors in adapter order.

    Every tensor among ``args`` and ``kwargs`` (nested in lists, tuples and dicts) whose first
    dimension is the batch size B is taken as per-sample and reordered by one stable sort of the
    ids; other values pass unchanged. ``restore(outputs)`` puts every output tensor with first
    dimension B back in the caller's order (differentiably). A batch already grouped is left as
    it is. Raises TypeError for torchrec's jagged inputs, which carry samples but are not rows."""
    batch = sample_adapter.numel()
    if batch < 2 or bool((sample_adapter[1:] >= sample_adapter[:-1]).all()):
        return args, kwargs, sample_adapter, lambda outputs: outputs
    order = torch.argsort(sample_adapter, stable=True)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch, device=order.device)

    def reorder(index):
        def apply(t):
            return t.index_select(0, index.to(t.device)) if t.dim() >= 1 and t.shape[0] == batch else t

        return apply

    grouped_args, grouped_kwargs = _map_tensors(reorder(order), (args, kwargs))
    return grouped_args, grouped_kwargs, sample_adapter[order], lambda out: _map_tensors(reorder(inverse), out)
