"""LoraLayer: what every wrapped module shares — the frozen ``base_layer``, per-adapter A and B
in ``nn.ParameterDict``s, each adapter's scale and dropout, which adapters are active or merged.

Subclasses (one file per wrapped type) define the shapes and init of A and B, the forward, the
delta that merging adds to the base weight, and the adapter's on-disk form.
"""

from __future__ import annotations

import torch
from torch import nn

from recpeft.kernels import AdapterWeights
from .routing import Routing, current_routing


class AdapterStateError(ValueError):
    """An adapter file's tensors do not fit the model (missing, unexpected or misshapen key)."""


class LoraLayer(nn.Module):
    """Base of every LoRA wrapper. ``module_name`` is the full name in the model (for errors)."""

    def __init__(self, base_layer: nn.Module, module_name: str):
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.scaling: dict[str, float] = {}
        self.lora_dropout: dict[str, float] = {}
        self.ranks: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # ---- subclass interface ----------------------------------------------------------------

    @staticmethod
    def check_supported(module: nn.Module, name: str) -> None:
        """Raise ValueError when ``module`` has a setting the wrapper cannot honour."""

    def adapter_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Shapes of (A, B) for rank r."""
        raise NotImplementedError

    def reset_adapter(self, adapter: str, init) -> None:
        """Initialise A and B of ``adapter`` (see LoraConfig.init_lora_weights)."""
        raise NotImplementedError

    def merge_delta(self, adapter: str, sign: float) -> None:
        """Add ``sign`` · (the adapter's delta) to the base weight in place."""
        raise NotImplementedError

    def export_adapter(self, adapter: str) -> dict[str, torch.Tensor]:
        """On-disk tensors of ``adapter`` keyed by suffix (``lora_A.weight`` ...)."""
        raise NotImplementedError

    def check_adapter_state(self, adapter: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Raise AdapterStateError naming the first key that does not fit."""
        raise NotImplementedError

    def load_adapter_state(self, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy checked tensors into the adapter."""
        raise NotImplementedError

    # ---- modules adapted part by part (a torchrec collection: one part per table) --------------

    @classmethod
    def part_names(cls, module: nn.Module) -> list[str] | None:
        """Names of the parts of ``module`` that adapters target one by one, addressed as
        ``"<module name>.<part>"``; None (the default) when the module is adapted whole."""
        return None

    def update_parts(self, adapter: str, parts: dict[str, tuple[int, float]], init) -> None:
        """Create ``adapter`` on ``parts`` ({part: (r, s)}); wrappers with part names only."""
        raise TypeError(f"{type(self).__name__} is adapted whole, not part by part")

    def untouched_parameters(self, adapter: str) -> int:
        """Adapter parameters training has not touched yet (rows of embedding adapters still zero)."""
        return 0

    # ---- adapters --------------------------------------------------------------------------

    @property
    def base_weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def update_layer(self, adapter: str, r: int, scale: float, dropout: float, init) -> None:
        """Create adapter ``adapter`` of rank r with its scale and dropout."""
        weight = self.base_weight
        shape_a, shape_b = self.adapter_shapes(r)
        self.lora_A[adapter] = nn.Parameter(weight.new_empty(shape_a))
        self.lora_B[adapter] = nn.Parameter(weight.new_empty(shape_b))
        self.scaling[adapter] = float(scale)
        self.lora_dropout[adapter] = float(dropout)
        self.ranks[adapter] = r
        with torch.no_grad():
            self.reset_adapter(adapter, init)

    def delete_adapter(self, adapter: str) -> None:
        if adapter in self.merged_adapters:
            raise ValueError(f"{self.module_name}: adapter {adapter!r} is merged; unmerge it before deleting")
        for store in (self.lora_A, self.lora_B):
            del store[adapter]
        del self.scaling[adapter], self.lora_dropout[adapter], self.ranks[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def pending_adapters(self) -> list[str]:
        """Active adapters that are not merged into the base weight."""
        if self.disabled:
            return []
        return [a for a in self.active_adapters if a in self.lora_A and a not in self.merged_adapters]

    def routed_adapters(self, routing: Routing) -> list[AdapterWeights | None]:
        """This layer's weights for every routed adapter name (None where it has no such adapter)."""
        self.refuse_routing_when_merged()
        dropout_on = self.training
        return [
            AdapterWeights(self.lora_A[n], self.lora_B[n], self.scaling[n],
                           self.lora_dropout[n] if dropout_on else 0.0) if n in self.lora_A else None
            for n in routing.adapter_names
        ]

    def refuse_routing_when_merged(self) -> None:
        if self.merged_adapters:
            raise RuntimeError(
                f"{self.module_name}: adapters {self.merged_adapters} are merged; unmerge before routing"
            )

    def has_adapter_work(self) -> bool:
        """Whether this forward adds anything to the base layer's output."""
        return self.active_routing() is not None or bool(self.pending_adapters())

    def active_routing(self) -> Routing | None:
        return None if self.disabled else current_routing()

    # ---- merging ---------------------------------------------------------------------------

    @torch.no_grad()
    def merge(self, adapters: list[str]) -> None:
        for adapter in adapters:
            if adapter in self.lora_A and adapter not in self.merged_adapters:
                self.merge_delta(adapter, +1.0)
                self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self, adapters: list[str] | None = None) -> None:
        """Subtract the deltas of ``adapters`` (default: every merged one) from the base weight."""
        for adapter in list(self.merged_adapters if adapters is None else adapters):
            if adapter in self.merged_adapters:
                self.merge_delta(adapter, -1.0)
                self.merged_adapters.remove(adapter)

    def _check_shape(self, key: str, tensor: torch.Tensor, expected: tuple, source: str) -> None:
        if tuple(tensor.shape) != tuple(expected):
            raise AdapterStateError(
                f"{source}: {self.module_name}.{key} has shape {tuple(tensor.shape)} but the model "
                f"expects {tuple(expected)}"
            )

    def _check_keys(self, tensors: dict, expected: set, source: str) -> None:
        missing = sorted(expected - tensors.keys())
        if missing:
            raise AdapterStateError(f"{source}: missing key {self.module_name}.{missing[0]}")
        unexpected = sorted(tensors.keys() - expected)
        if unexpected:
            raise AdapterStateError(f"{source}: unexpected key {self.module_name}.{unexpected[0]}")

    def extra_repr(self) -> str:
        ranks = {a: tuple(self.lora_A[a].shape) for a in self.lora_A}
        return f"name={self.module_name!r}, adapters={ranks}, active={self.active_adapters}"
