"""Modules trained in full beside the adapter (``LoraConfig.modules_to_save``), e.g. a task head.

The wrapper keeps the frozen original and one trainable copy per adapter; the copy of the first
active adapter that has one runs (copies do not add up the way LoRA deltas do). With per-sample routing each adapter's copy runs on the whole batch and each sample
takes the output of its own adapter's copy (samples with −1 take the original's), so the
module's output must have the samples first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .base import AdapterStateError
from .routing import current_routing


class ModulesToSaveWrapper(nn.Module):
    def __init__(self, original_module: nn.Module, module_name: str):
        super().__init__()
        self.original_module = original_module
        self.module_name = module_name
        self.modules_to_save = nn.ModuleDict()
        self.active_adapters: list[str] = []
        self.disabled = False

    def update(self, adapter: str) -> None:
        module = copy.deepcopy(self.original_module)
        for param in module.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter] = module

    def delete_adapter(self, adapter: str) -> None:
        del self.modules_to_save[adapter]
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def _active(self) -> nn.Module:
        for adapter in self.active_adapters:
            if adapter in self.modules_to_save:
                return self.modules_to_save[adapter]
        return self.original_module

    def forward(self, *args, **kwargs):
        routing = None if self.disabled else current_routing()
        if routing is None:
            return (self.original_module if self.disabled else self._active())(*args, **kwargs)
        out = self.original_module(*args, **kwargs)
        if out.shape[0] != routing.sample_adapter.numel():
            raise ValueError(
                f"{self.module_name}: per-sample routing needs this module's output to have the "
                f"{routing.sample_adapter.numel()} samples first, got shape {tuple(out.shape)}"
            )
        sample_adapter = routing.sample_adapter.to(out.device)
        for index, name in enumerate(routing.adapter_names):
            if name not in self.modules_to_save:
                continue
            rows = (sample_adapter == index).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_copy(0, rows, self.modules_to_save[name](*args, **kwargs).index_select(0, rows))
        return out

    def export_adapter(self, adapter: str) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.modules_to_save[adapter].state_dict().items()}

    def check_adapter_state(self, adapter: str, tensors: dict, source: str) -> None:
        expected = self.modules_to_save[adapter].state_dict()
        for key in sorted(expected.keys() - tensors.keys())[:1]:
            raise AdapterStateError(f"{source}: missing key {self.module_name}.modules_to_save.{key}")
        for key in sorted(tensors.keys() - expected.keys())[:1]:
            raise AdapterStateError(f"{source}: unexpected key {self.module_name}.modules_to_save.{key}")
        for key, value in expected.items():
            if tuple(tensors[key].shape) != tuple(value.shape):
                raise AdapterStateError(
                    f"{source}: {self.module_name}.modules_to_save.{key} has shape {tuple(tensors[key].shape)} "
                    f"but the model expects {tuple(value.shape)}"
                )

    def load_adapter_state(self, adapter: str, tensors: dict) -> None:
        self.modules_to_save[adapter].load_state_dict(tensors)
