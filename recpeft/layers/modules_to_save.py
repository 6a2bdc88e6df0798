"""Modules trained in full beside the adapter (``LoraConfig.modules_to_save``), e.g. a task head.

The wrapper keeps the frozen original and one trainable copy per adapter; the copy of the first
active adapter that has one runs (copies do not add up the way LoRA deltas do). With per-sample
routing each adapter's copy runs on the whole batch and each sample takes the output of its own
adapter's copy (samples with −1 take the original's), so the module's output must have the
samples first.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .adapter_holder import AdapterHolder, sparse_embedding_weights
from .adapter_state import check_adapter_tensors


class ModulesToSaveWrapper(AdapterHolder):
    """The frozen ``original_module`` and one trainable copy per adapter in ``modules_to_save``.

    Adapters here are not deltas: merging and unmerging do nothing (``merged_adapters`` stays
    empty), and ``merge_and_unload`` keeps the first active adapter's copy (:meth:`unwrap`).

    Example::

        head = ModulesToSaveWrapper(nn.Linear(16, 1), "head")
        head.update("default")
        head.active_adapters = ["default"]
        y = head(torch.randn(8, 16))             # the copy runs: [8, 1]
    """

    HF_PEFT_LAYOUT = True  # the copy's state_dict under the module's own name, as HF PEFT saves it

    def __init__(self, original_module: nn.Module, module_name: str):
        super().__init__(module_name)
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()

    def update(self, adapter: str) -> None:
        """Create ``adapter``: a trainable copy of the original module."""
        module = copy.deepcopy(self.original_module)
        for param in module.parameters():
            param.requires_grad_(True)
        self.modules_to_save[adapter] = module

    # ---- the adapter-holder protocol -------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save)

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """Every parameter of ``adapter``'s copy."""
        return list(self.modules_to_save[adapter].parameters())

    def sparse_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The weights of the copy's embeddings built with ``sparse=True``."""
        return sparse_embedding_weights(self.modules_to_save[adapter])

    def drop_adapter(self, adapter: str) -> None:
        if adapter in self.modules_to_save:
            del self.modules_to_save[adapter]

    def merge(self, adapters: list[str]) -> None:
        """Nothing to merge: a copy is not a delta; it runs in place of the original while active."""

    def unmerge(self, adapters: list[str] | None = None) -> None:
        """Nothing to unmerge (see :meth:`merge`)."""

    def unwrap(self, keep_trained: bool) -> nn.Module:
        """With ``keep_trained`` the first active adapter's copy (the original when none is), else
        the original."""
        return self._active() if keep_trained else self.original_module

    def _active(self) -> nn.Module:
        for adapter in self.active_adapters:
            if adapter in self.modules_to_save:
                return self.modules_to_save[adapter]
        return self.original_module

    # ---- forward ---------------------------------------------------------------------------------

    def forward(self, *args, **kwargs):
        routing = self.active_routing()
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

    # ---- on disk ---------------------------------------------------------------------------------

    def export_adapter(self, adapter: str) -> dict[str, torch.Tensor]:
        """The copy's state_dict under its own keys (``weight``, ``bias``): HF PEFT's file layout,
        where a saved module's tensors stand under the module's name as in the base model."""
        return {k: v.detach() for k, v in self.modules_to_save[adapter].state_dict().items()}

    def check_adapter_state(self, adapter: str, tensors: dict, source: str) -> None:
        expected = dict(self.modules_to_save[adapter].state_dict())
        check_adapter_tensors(tensors, expected, source=source, prefix=f"{self.module_name}.")

    def load_adapter_state(self, adapter: str, tensors: dict) -> None:
        self.modules_to_save[adapter].load_state_dict(dict(tensors))
