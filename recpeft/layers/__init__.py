"""LoRA wrappers, one file per wrapped module type, and the registry that maps type → wrapper.

Every module that holds adapters is an :class:`AdapterHolder` (its protocol: adapter names,
parameters, sparse and untouched parameters, merge, delete, export / check / load):

    AdapterHolder                       adapter_holder.py — the protocol and shared bookkeeping
    ├── LoraLayer                       base.py — any LoRA wrapper: base_layer, creation, merge loop
    │   ├── LoraWeightLayer             weight.py — one weight: A, B ParameterDicts, s and r per adapter
    │   │   ├── LoraLinear              linear.py (DoRA: dora.py's DoraLayer, mixed in)
    │   │   │   └── LoraConv            conv.py — Conv1d / Conv2d: LoRA on the matrix of patches
    │   │   └── LoraTableLayer          table.py → LoraEmbedding (DoRA too), LoraEmbeddingBag
    │   └── LoraCollectionLayer         torchrec/collection.py — per-table A_t, B_t, s_t, r_t
    └── ModulesToSaveWrapper            modules_to_save.py — a trained copy per adapter

May import: ``recpeft.kernels`` (the ops) and ``recpeft.utils``; nothing else of recpeft.
"""

from __future__ import annotations

import sys

from torch import nn

from .adapter_holder import AdapterHolder, AdapterStateError
from .base import LoraLayer
from .conv import LoraConv
from .embedding import LoraEmbedding
from .embedding_bag import LoraEmbeddingBag
from .linear import LoraLinear
from .modules_to_save import ModulesToSaveWrapper
from .routing import Routing, current_routing
from .weight import LoraWeightLayer

#: wrapped module type → LoRA wrapper. Later integrations (torchrec) register theirs here.
LORA_WRAPPERS: dict[type[nn.Module], type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Embedding: LoraEmbedding,
    nn.EmbeddingBag: LoraEmbeddingBag,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
}


def register_wrapper(module_type: type[nn.Module], wrapper: type[LoraLayer]) -> None:
    """Make ``wrapper`` the LoRA wrapper of ``module_type`` (and of its subclasses without their own)."""
    LORA_WRAPPERS[module_type] = wrapper


_torchrec_registered = False


def _register_torchrec_wrappers() -> None:
    """Register the torchrec collection wrappers (:mod:`.torchrec`) once torchrec is imported —
    a model holding a torchrec module has imported it — so that ``import recpeft`` does not
    import torchrec and fbgemm (about 2.5 s), and machines without torchrec never do."""
    global _torchrec_registered
    if _torchrec_registered or "torchrec" not in sys.modules:
        return
    _torchrec_registered = True
    try:
        from .torchrec import TORCHREC_WRAPPERS
    except ImportError:
        return
    for module_type, wrapper in TORCHREC_WRAPPERS.items():
        register_wrapper(module_type, wrapper)


def wrapper_for(module: nn.Module) -> type[LoraLayer] | None:
    """The wrapper for ``module``'s type or its nearest registered base class."""
    _register_torchrec_wrappers()
    for cls in type(module).__mro__:
        if cls in LORA_WRAPPERS:
            return LORA_WRAPPERS[cls]
    return None


__all__ = [
    "AdapterHolder",
    "AdapterStateError",
    "LORA_WRAPPERS",
    "LoraConv",
    "LoraEmbedding",
    "LoraEmbeddingBag",
    "LoraLayer",
    "LoraLinear",
    "LoraWeightLayer",
    "ModulesToSaveWrapper",
    "Routing",
    "current_routing",
    "register_wrapper",
    "wrapper_for",
]
