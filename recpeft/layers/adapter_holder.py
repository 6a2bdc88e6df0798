"""AdapterHolder: the one protocol of every module that holds named adapters — the LoRA wrappers of
every kind and :class:`~recpeft.layers.modules_to_save.ModulesToSaveWrapper` — and the bookkeeping
they share: which adapters are active, merged, or switched off, deleting one, refusing per-sample
routing while a delta is merged into the frozen weights.

``PeftModel`` and the Trainer only iterate over holders and call this protocol; what an adapter is
(an A/B pair, per-table adapter collections, a trained copy of the module) stays inside its holder.

    for holder in holders:
        for adapter in holder.adapter_names():
            holder.export_adapter(adapter)        # {key under the module: tensor}, as saved
            holder.sparse_parameters(adapter)     # [lora_A] of an embedding adapter; [] for linear
"""

from __future__ import annotations

import torch
from torch import nn

from .routing import Routing, current_routing


class AdapterStateError(ValueError):
    """An adapter file's tensors do not fit the model (missing, unexpected or misshapen key)."""


class AdapterHolder(nn.Module):
    """Base of every module holding adapters. ``module_name`` is its full name in the model (for errors).

    State every holder keeps: ``active_adapters`` (those that run, in order), ``merged_adapters``
    (those whose delta is in the frozen weights; always empty where adapters are not deltas) and
    ``disabled`` (the frozen module alone runs, as in ``PeftModel.disable_adapter``).

    Subclasses define the methods that raise NotImplementedError here.

    ``HF_PEFT_LAYOUT``: whether the holder's file tensors are keyed as HF PEFT keys the same layer
    (Linear LoRA, a module saved whole); an adapter with any other holder is saved as recpeft's
    own format (``peft_type`` ``"RECPEFT_LORA"``), which HF PEFT refuses instead of loading it
    half-way.
    """

    HF_PEFT_LAYOUT = False

    def __init__(self, module_name: str):
        super().__init__()
        self.module_name = module_name
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False

    # ---- what a holder holds ---------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        """Names of the adapters held here, in the order they were added."""
        raise NotImplementedError

    def has_adapter(self, adapter: str) -> bool:
        """Whether ``adapter`` is held here."""
        return adapter in self.adapter_names()

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """Every parameter of ``adapter`` (the ones training updates; PeftModel sets their
        ``requires_grad``)."""
        raise NotImplementedError

    def sparse_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The parameters of ``adapter`` whose gradients are sparse (rows of a batch's ids only),
        a subset of :meth:`adapter_parameters`: the Trainer steps them with LoraAdamW. Default: none."""
        return []

    def untouched_parameters(self, adapter: str) -> int:
        """Entries of ``adapter``'s parameters that training has not touched yet (the rows of an
        embedding adapter's A still zero), held by this process. Default: 0."""
        return 0

    def unwrap(self, keep_trained: bool) -> nn.Module:
        """The plain module that takes this holder's place when the adapters are unloaded: with
        ``keep_trained``, what runs here with the active adapters merged (the caller merges
        first); without, the original module (the caller unmerges first)."""
        raise NotImplementedError

    # ---- switching, merging, deleting ------------------------------------------------------------

    def pending_adapters(self) -> list[str]:
        """Active adapters held here that are not merged (none while disabled)."""
        if self.disabled:
            return []
        return [a for a in self.active_adapters if self.has_adapter(a) and a not in self.merged_adapters]

    def set_active_adapters(self, names: list[str]) -> None:
        """Make those of ``names`` held here the active adapters; merged adapters not among
        ``names`` are unmerged first (a merged adapter that stops being active leaves the weights)."""
        leaving = [a for a in self.merged_adapters if a not in names]
        if leaving:
            self.unmerge(leaving)
        self.active_adapters = [n for n in names if self.has_adapter(n)]

    def merge(self, adapters: list[str]) -> None:
        """Add the deltas of those of ``adapters`` held here and not merged yet into the frozen
        weights, recording them in ``merged_adapters``."""
        raise NotImplementedError

    def unmerge(self, adapters: list[str] | None = None) -> None:
        """Subtract the deltas of ``adapters`` (default: every merged one) from the frozen weights."""
        raise NotImplementedError

    def delete_adapter(self, adapter: str) -> None:
        """Remove ``adapter`` (which must not be merged) and everything held for it."""
        if adapter in self.merged_adapters:
            raise ValueError(f"{self.module_name}: adapter {adapter!r} is merged; unmerge it before deleting")
        self.drop_adapter(adapter)
        self.active_adapters = [a for a in self.active_adapters if a != adapter]

    def drop_adapter(self, adapter: str) -> None:
        """Forget ``adapter``'s parameters and settings; tolerates an adapter whose creation
        failed half way (the caller removes it from the bookkeeping)."""
        raise NotImplementedError

    # ---- per-sample routing ----------------------------------------------------------------------

    def active_routing(self) -> Routing | None:
        """The per-sample routing of the current forward, None when there is none or while disabled."""
        return None if self.disabled else current_routing()

    def refuse_routing_when_merged(self) -> None:
        """Raise RuntimeError while a delta is merged: a merged delta would apply to every sample."""
        if self.merged_adapters:
            raise RuntimeError(
                f"{self.module_name}: adapters {self.merged_adapters} are merged; unmerge before routing"
            )

    # ---- on disk ---------------------------------------------------------------------------------

    def export_adapter(self, adapter: str) -> dict[str, torch.Tensor]:
        """The tensors saved for ``adapter``, keyed by their name under this module (the file key is
        ``<module name>.<key>``); collective where the adapter is sharded."""
        raise NotImplementedError

    def check_adapter_state(self, adapter: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Raise AdapterStateError (one line naming ``source`` and the key) when ``tensors``, keyed as
        :meth:`export_adapter` keys them, do not fit ``adapter``: missing, unexpected or misshapen key."""
        raise NotImplementedError

    def load_adapter_state(self, adapter: str, tensors: dict[str, torch.Tensor]) -> None:
        """Copy ``tensors`` (checked by :meth:`check_adapter_state`) into ``adapter``."""
        raise NotImplementedError


def sparse_embedding_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weights of the ``nn.Embedding`` / ``nn.EmbeddingBag`` with ``sparse=True`` in ``module``
    (itself included): parameters whose gradients are sparse."""
    return [m.weight for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
