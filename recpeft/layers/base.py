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

import torch
from torch import nn

from .adapter_holder import AdapterHolder, AdapterStateError

__all__ = ["AdapterStateError", "LoraLayer", "merge_product"]


def merge_product(left: torch.Tensor, right: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Δ = scale·(left @ right), the delta merging adds to a frozen weight of ``dtype``: computed in
    ``dtype`` promoted to at least float32 (a float64 weight gets a float64 product; a 16-bit one a
    float32 product rounded once at the end) and returned in ``dtype``."""
    compute = torch.promote_types(dtype, torch.float32)
    return ((left.to(compute) @ right.to(compute)) * scale).to(dtype)


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
