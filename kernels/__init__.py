"""recpeft.kernels: tensor ops for low-rank adapters, with no model knowledge.

Every op has a plain-PyTorch version in :mod:`recpeft.kernels.reference` (the CPU path and the
test oracle; its many-adapter ops loop over rows grouped once in :mod:`recpeft.kernels.grouped`)
and a Triton version in the module named after the op
(:mod:`recpeft.kernels.lora_linear`, :mod:`recpeft.kernels.lora_embedding_bag`, and
:mod:`recpeft.kernels.segmented_lora` for many adapters in one batch), which share their launch
constants through :mod:`recpeft.kernels.launch`; :mod:`recpeft.kernels.dispatch`
picks the implementation per call (``dispatch.lora_linear(...)``). This package imports nothing
from :mod:`recpeft`.
"""

from . import dispatch
from .bags import BagLayout, bag_layout, unpooled_layout, validate_ids
from .dispatch import Backend, resolve_backend
from .reference import AdapterWeights, group_by_adapter

__all__ = [
    "AdapterWeights",
    "Backend",
    "BagLayout",
    "bag_layout",
    "dispatch",
    "group_by_adapter",
    "resolve_backend",
    "unpooled_layout",
    "validate_ids",
]
