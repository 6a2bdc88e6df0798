"""LoRA around torchrec's ``EmbeddingCollection``."""

from __future__ import annotations

import torch
from torchrec.modules.embedding_modules import EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor

from .collection import LoraCollectionLayer, keep_samples, resolved


class LoraEmbeddingCollection(LoraCollectionLayer):
    """out_f[k] = E_t[i_k] + s_t·A_t[i_k]·B_t for every id i_k of a feature f of an adapted table t.

    Takes and returns exactly what the wrapped ``EmbeddingCollection`` does: a
    ``KeyedJaggedTensor`` in, ``Dict[str, JaggedTensor]`` out (per feature: values [L_f, D], the
    input's lengths, the ids as weights when the base collection has ``need_indices``).
    torchrec requires one embedding dimension per EmbeddingCollection, so an adapter's tables are
    grouped by rank, one adapter collection per rank (``lora_A[adapter]["rank<r>"]``).

    Example::

        ec = EmbeddingCollection([EmbeddingConfig(name="t_item", embedding_dim=16,
                                                  num_embeddings=1000, feature_names=["item"])])
        layer = LoraEmbeddingCollection(ec, "ec")
        layer.update_parts("default", {"t_item": (4, 1.0)}, init=True)
        layer.active_adapters = ["default"]
        out = layer(KeyedJaggedTensor.from_lengths_sync(["item"], torch.tensor([3, 7, 9]), torch.tensor([2, 1])))
        out["item"].values().shape   # [3, 16]
    """

    TABLE_ATTR = "embeddings"

    @staticmethod
    def table_configs(module: EmbeddingCollection) -> list:
        return module.embedding_configs()

    @staticmethod
    def group_for(rank: int) -> str:
        return f"rank{rank}"

    def make_adapter_collection(self, configs):
        collection = EmbeddingCollection(configs, device=self._device())
        for embedding in collection.embeddings.values():
            embedding.sparse = True  # rows of the batch only; DistributedModelParallel replaces them anyway
        return collection

    # the EmbeddingCollection interface, for code that inspects the module
    def embedding_configs(self):
        return self.base_layer.embedding_configs()

    def need_indices(self) -> bool:
        return self.base_layer.need_indices()

    def embedding_dim(self) -> int:
        return self.base_layer.embedding_dim()

    def embedding_names_by_table(self):
        return self.base_layer.embedding_names_by_table()

    def forward(self, features: KeyedJaggedTensor) -> dict[str, JaggedTensor]:
        if not self.has_adapter_work():
            return self.base_layer(features)
        base = self.base_forward(features)
        deltas = self.feature_deltas(features)
        return {
            key: JaggedTensor(
                values=jt.values() + deltas[key],
                lengths=jt.lengths(),
                offsets=jt.offsets(),
                weights=jt.weights_or_none(),
            )
            if key in deltas
            else jt
            for key, jt in base.items()
        }

    def adapter_deltas(self, adapter, features, keep):
        """Per feature s_t·A_t[ids]·B_t [L_f, D]; with ``keep`` the adapter looked up only the kept
        samples' ids, whose rows are put back at their positions (the others get zero)."""
        lora_B, scaling = self.lora_B[adapter], self.scaling[adapter]
        routed = features if keep is None else keep_samples(features, keep)
        looked_up = {group: resolved(collection(routed)) for group, collection in self.lora_A[adapter].items()}
        deltas = {}
        for f in self.lookups[adapter]:
            delta = (looked_up[f.group][f.adapter_key].values() @ lora_B[f.table]).mul_(scaling[f.table])
            if keep is not None:  # rows of the kept ids, in order, back to their positions among all ids
                kept_ids = keep.repeat_interleave(features[f.feature].lengths().to(torch.int64))
                delta = delta.new_zeros(kept_ids.numel(), delta.shape[1]).index_copy(
                    0, kept_ids.nonzero().squeeze(1), delta
                )
            deltas[f.base_key] = delta
        return deltas
