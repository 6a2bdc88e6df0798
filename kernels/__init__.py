"""recpeft.kernels: tensor ops for low-rank adapters, with no model knowledge.

Every op has a plain-PyTorch version in :mod:`recpeft.kernels.reference` (the CPU path and the
test oracle); :mod:`recpeft.kernels.dispatch` picks the implementation per call. This package
imports nothing from :mod:`recpeft`.
"""

from .bags import BagLayout, bag_layout, unpooled_layout, validate_ids
from .dispatch import (
    Backend,
    lora_embedding_bag,
    lora_linear,
    resolve_backend,
    segmented_lora_bag_delta,
    segmented_lora_linear,
)
from .reference import AdapterWeights, group_by_adapter

__all__ = [
    "AdapterWeights",
    "Backend",
    "BagLayout",
    "bag_layout",
    "group_by_adapter",
    "lora_embedding_bag",
    "lora_linear",
    "resolve_backend",
    "segmented_lora_bag_delta",
    "segmented_lora_linear",
    "unpooled_layout",
    "validate_ids",
]
