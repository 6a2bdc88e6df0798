"""LoraWeightLayer: LoRA on a module with one frozen weight W (``nn.Linear``, ``nn.Embedding``,
``nn.EmbeddingBag``): per adapter one A and one B in ``nn.ParameterDict``s, its scale s_a, its
dropout p_a and its rank r_a.

Subclasses (one file per wrapped type) define the shapes and init of A and B, the forward, the
delta that merging adds to W, and the adapter's on-disk form.
"""

from __future__ import annotations

import torch
from torch import nn

from recpeft.kernels import AdapterWeights
from recpeft.kernels.reference import RoutedAdapters

from .base import LoraLayer
from .routing import RoutedListCache, Routing


class LoraWeightLayer(LoraLayer):
    """Base of the LoRA wrappers of a module with one weight ``base_layer.weight``."""

    def __init__(self, base_layer: nn.Module, module_name: str):
        super().__init__(base_layer, module_name)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        self._routed_lists = RoutedListCache()

    # ---- subclass interface ----------------------------------------------------------------------

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for rank r."""
        raise NotImplementedError

    def reset_adapter(self, adapter: str, init) -> None:
        """Initialise A and B of ``adapter`` (see LoraConfig.init_lora_weights)."""
        raise NotImplementedError

    # ---- adapters --------------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def has_adapter(self, adapter: str) -> bool:
        return adapter in self.lora_A

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """[A, B] of ``adapter``."""
        return [self.lora_A[adapter], self.lora_B[adapter]]

    def update_layer(self, adapter: str, r: int, scale: float, dropout: float, init) -> None:
        weight = self.base_weight
        shape_a, shape_b = self.adapter_shapes(r)
        self.lora_A[adapter] = nn.Parameter(weight.new_empty(shape_a))
        self.lora_B[adapter] = nn.Parameter(weight.new_empty(shape_b))
        self.scaling[adapter] = float(scale)
        self.lora_dropout[adapter] = float(dropout)
        self.ranks[adapter] = r
        with torch.no_grad():
            self.reset_adapter(adapter, init)

    def drop_adapter(self, adapter: str) -> None:
        for store in (self.lora_A, self.lora_B):
            if adapter in store:
                del store[adapter]
        for settings in (self.scaling, self.lora_dropout, self.ranks):
            settings.pop(adapter, None)

    def routed_adapters(self, routing: Routing) -> RoutedAdapters:
        """This layer's weights for every routed adapter name (None where it has no such adapter)."""
        self.refuse_routing_when_merged()
        dropout_on = self.training
        # the ParameterDicts' own name → Parameter maps: items() costs a getattr per entry, which at
        # hundreds of routed adapters per call is most of a small batch's time
        a, b = self.lora_A._parameters, self.lora_B._parameters

        # A serving loop routes the same adapters call after call: the list is kept while the
        # names, the mode, the parameter objects and the scales and dropouts are the same
        # (in-place updates of the values need no new list; the tensors are the same)
        def key():
            return (
                routing.adapter_names,
                dropout_on,
                tuple(map(id, a.values())),
                tuple(map(id, b.values())),
                tuple(self.scaling.items()),
                tuple(self.lora_dropout.items()),
            )

        def build():
            return RoutedAdapters(
                AdapterWeights(a[n], b[n], self.scaling[n], self.lora_dropout[n] if dropout_on else 0.0)
                if n in a
                else None
                for n in routing.adapter_names
            )

        return self._routed_lists.get(routing, dropout_on, key, build)

    def extra_repr(self) -> str:
        ranks = {a: tuple(self.lora_A[a].shape) for a in self.lora_A}
        return f"name={self.module_name!r}, adapters={ranks}, active={self.active_adapters}"
