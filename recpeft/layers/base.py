"""LoraLayer: what every LoRA wrapper shares — the frozen ``base_layer``, how PeftModel creates an
adapter on it (whole, or part by part for a torchrec collection), the merge loop W' = W ± Δ_a.

``isinstance(m, LoraLayer)`` means "m is a LoRA wrapper". Two families sit under it, each owning
its own adapter storage, so no subclass changes the types of what it inherits:

- :class:`~recpeft.layers.weight.LoraWeightLayer` — one weight W per module (linear, embedding,
  embedding bag): per adapter one A and one B in ``nn.ParameterDict``s, one scale, one rank;
- :class:`~recpeft.layers.torchrec.LoraCollectionLayer` — a torchrec collection of tables: per
  adapter adapter collections holding A_t, a B_t, a scale and a rank per table t.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapter_holder import AdapterHolder, AdapterStateError

__all__ = ["AdapterFactors", "AdapterStateError", "LoraLayer", "merge_product"]


def merge_product(left: torch.Tensor, right: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Δ = scale·(left @ right), the delta merging adds to a frozen weight of ``dtype``: computed in
    ``dtype`` promoted to at least float32 (a float64 weight gets a float64 product; a 16-bit one a
    float32 product rounded once at the end) and returned in ``dtype``."""
    compute = torch.promote_types(dtype, torch.float32)
    return ((left.to(compute) @ right.to(compute)) * scale).to(dtype)


@dataclass(frozen=True)
class AdapterFactors:
    """One adapter's factors on one weight, as :meth:`LoraLayer.adapter_factors` reads them and
    :meth:`LoraLayer.set_adapter_factors` writes them (``recpeft.peft.weighted_merge`` combines them).

    ``rows`` None — a Linear layer: A [r, K], B [N, r], Δ = scale·B·A [N, K].
    ``rows`` [n] int64 ascending — a table [V, D]: ``lora_A`` [n, r] holds the rows ``rows`` of the
    adapter's A [V, r] (its touched rows; every other row is zero), B [r, D], Δ[rows] = scale·A·B
    and every other row of Δ is zero.
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    rows: torch.Tensor | None = None


def check_factors(where: str, factors: dict[str, AdapterFactors], expected: dict[str, tuple]) -> None:
    """ValueError naming ``where`` and the part unless ``factors`` has exactly the parts of
    ``expected`` ({part: (shape of A, shape of B, scale)}) with those shapes and scales. A shape of
    A that starts with None is a table's: the factors must list their rows, one per row of A."""
    if set(factors) != set(expected):
        raise ValueError(f"{where}: factors for parts {sorted(factors)} but the adapter has {sorted(expected)}")
    for part, (shape_a, shape_b, scale) in expected.items():
        f, name = factors[part], f"{where}.{part}" if part else where
        table = shape_a[0] is None
        if table != (f.rows is not None) or (table and f.rows.dim() != 1):
            raise ValueError(f"{name}: factors {'need' if table else 'take no'} 1-D rows (a table's A lists its rows)")
        shape_a = (f.rows.numel(), *shape_a[1:]) if table else tuple(shape_a)
        got = (tuple(f.lora_A.shape), tuple(f.lora_B.shape))
        if got != (tuple(shape_a), tuple(shape_b)):
            raise ValueError(f"{name}: factors of shapes {got} do not fit A {tuple(shape_a)}, B {tuple(shape_b)}")
        if f.scale != scale:
            raise ValueError(f"{name}: factors have scale {f.scale} but the adapter's is {scale}")


class LoraLayer(AdapterHolder):
    """Base of every LoRA wrapper: ``base_layer`` is the frozen wrapped module, ``module_name`` its
    full name in the model (for errors)."""

    def __init__(self, base_layer: nn.Module, module_name: str):
        super().__init__(module_name)
        self.base_layer = base_layer

    # ---- wrapping (the registry's wrapper types, called by PeftModel) ----------------------------

    @staticmethod
    def check_supported(module: nn.Module, name: str) -> None:
        """Raise ValueError when ``module`` has a setting the wrapper cannot honour."""

    @classmethod
    def part_names(cls, module: nn.Module) -> list[str] | None:
        """Names of the parts of ``module`` that adapters target one by one, addressed as
        ``"<module name>.<part>"``; None (the default) when the module is adapted whole."""
        return None

    def update_layer(self, adapter: str, r: int, scale: float, dropout: float, init) -> None:
        """Create adapter ``adapter`` of rank r on the whole module, with scale s and dropout p;
        ``init`` is LoraConfig.init_lora_weights."""
        raise NotImplementedError

    def update_parts(self, adapter: str, parts: dict[str, tuple[int, float]], init) -> None:
        """Create ``adapter`` on ``parts`` ({part: (r, s)}); wrappers with part names only."""
        raise TypeError(f"{type(self).__name__} is adapted whole, not part by part")

    def unwrap(self, keep_trained: bool) -> nn.Module:
        """``base_layer`` either way: merged deltas live in its weights."""
        return self.base_layer

    # ---- forward ---------------------------------------------------------------------------------

    def has_adapter_work(self) -> bool:
        """Whether this forward adds anything to the base layer's output."""
        return self.active_routing() is not None or bool(self.pending_adapters())

    # ---- factors (add_weighted_adapter) ----------------------------------------------------------

    def adapter_factors(self, adapter: str) -> dict[str, AdapterFactors]:
        """``adapter``'s factors per part ("" for a module adapted whole); a wrapper without them
        raises a one-line ValueError naming the module."""
        raise ValueError(f"{self.module_name}: {type(self).__name__} gives no factors to combine")

    def set_adapter_factors(self, adapter: str, factors: dict[str, AdapterFactors]) -> None:
        """Write ``factors`` (keyed as :meth:`adapter_factors` keys them, of the adapter's ranks
        and scales) into ``adapter``."""
        raise ValueError(f"{self.module_name}: {type(self).__name__} takes no factors")

    # ---- merging --------------------------------------------------------------------------------

    def merge_delta(self, adapter: str, sign: float) -> None:
        """Add ``sign`` · (the adapter's delta) to the frozen weights in place."""
        raise NotImplementedError

    def check_merge(self, adapters: list[str]) -> None:
        """Raise ValueError when ``adapters`` cannot be merged as asked (default: they can)."""

    @torch.no_grad()
    def merge(self, adapters: list[str]) -> None:
        """W ← W + Δ_a for each of ``adapters`` held here and not merged yet (Δ_a = s·B·A for a
        linear layer, s·A·B on the touched rows of a table)."""
        self.check_merge([a for a in adapters if self.has_adapter(a) and a not in self.merged_adapters])
        for adapter in adapters:
            if self.has_adapter(adapter) and adapter not in self.merged_adapters:
                self.merge_delta(adapter, +1.0)
                self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self, adapters: list[str] | None = None) -> None:
        """W ← W − Δ_a for each of ``adapters`` (default: every merged one) that is merged, the
        last merged first (which a merge that is not a plain sum, DoRA's, needs)."""
        leaving = set(self.merged_adapters if adapters is None else adapters)
        for adapter in reversed(list(self.merged_adapters)):
            if adapter in leaving:
                self.merge_delta(adapter, -1.0)
                self.merged_adapters.remove(adapter)
