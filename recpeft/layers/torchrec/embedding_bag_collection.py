"""LoRA around torchrec's ``EmbeddingBagCollection``."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from .collection import LoraCollectionLayer, keep_samples, resolved


class LoraEmbeddingBagCollection(LoraCollectionLayer):
    """pooled_f[j] = Σ w_i·E_t[i] + s_t·(Σ w_i·A_t[i])·B_t for every feature f of an adapted table t.

    Takes and returns exactly what the wrapped ``EmbeddingBagCollection`` does: a
    ``KeyedJaggedTensor`` (stride B, optional per-id weights for a weighted collection) in, a
    ``KeyedTensor`` [B, Σ_f D_f] with the same keys and order out. Sum and mean pooling. One
    adapter collection per adapter (tables of different ranks together), weighted when the base
    is; its tables get sparse gradients when unsharded.

    Example::

        ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_user", embedding_dim=16,
                                                         num_embeddings=1000, feature_names=["user"])])
        layer = LoraEmbeddingBagCollection(ebc, "ebc")
        layer.update_parts("default", {"t_user": (4, 1.0)}, init=True)
        layer.active_adapters = ["default"]
        out = layer(KeyedJaggedTensor.from_lengths_sync(["user"], torch.tensor([3, 7]), torch.tensor([1, 1])))
        out.values().shape   # [2, 16]
    """

    TABLE_ATTR = "embedding_bags"

    @staticmethod
    def table_configs(module: EmbeddingBagCollection) -> list:
        return module.embedding_bag_configs()

    @staticmethod
    def group_for(rank: int) -> str:
        return "tables"

    def make_adapter_collection(self, configs):
        collection = EmbeddingBagCollection(configs, is_weighted=self.base_layer.is_weighted(), device=self._device())
        for bag in collection.embedding_bags.values():
            bag.sparse = True  # rows of the batch only; DistributedModelParallel replaces the bags anyway
        return collection

    # the EmbeddingBagCollection interface, for code that inspects the module
    def embedding_bag_configs(self):
        return self.base_layer.embedding_bag_configs()

    def is_weighted(self) -> bool:
        return self.base_layer.is_weighted()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if not self.has_adapter_work():
            return self.base_layer(features)
        base = self.base_forward(features)
        deltas = self.feature_deltas(features)
        pieces = base.values().split(base.length_per_key(), dim=1)
        values = torch.cat([p + deltas[k] if k in deltas else p for k, p in zip(base.keys(), pieces)], dim=1)
        return KeyedTensor(keys=base.keys(), length_per_key=base.length_per_key(), values=values)

    def adapter_deltas(self, adapter, features, keep):
        """Per feature s_t·(pooled A_t)·B_t [B, D]; a sample outside ``keep`` pools an empty bag."""
        lora_B, scaling = self.lora_B[adapter], self.scaling[adapter]
        if keep is not None:
            features = keep_samples(features, keep)
        pooled = {group: resolved(collection(features)).to_dict() for group, collection in self.lora_A[adapter].items()}
        return {
            f.base_key: (pooled[f.group][f.adapter_key] @ lora_B[f.table]).mul_(scaling[f.table])
            for f in self.lookups[adapter]
        }
