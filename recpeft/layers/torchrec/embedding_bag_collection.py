"""LoRA around torchrec's ``EmbeddingBagCollection``."""

from __future__ import annotations

import operator
from itertools import chain

import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recpeft.kernels import AdapterWeights, bag_layout, dispatch
from recpeft.kernels.reference import RoutedAdapters

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

    def segmented_deltas(self, features, sample_adapter, routing):
        """Per adapted feature f of table t, one :func:`~recpeft.kernels.dispatch.segmented_lora_bag_delta`
        over its bags with every routed adapter's (A_t, B_t, s_t) — sample j through adapter
        a_j — instead of a lookup per adapter over the whole batch. None when a table is sharded
        (its rows live in other processes: the per-adapter lookups then)."""
        per_table = self._routed_tables(routing)
        if per_table is None:
            return None
        configs = {c.name: c for c in self.table_configs(self.base_layer)}
        deltas = {}
        for table, per_adapter in per_table.items():
            config = configs[table]
            mode = "mean" if config.pooling == PoolingType.MEAN else "sum"
            for feature, base_key in zip(config.feature_names, self._base_keys[table]):
                bags = features[feature]
                layout = bag_layout(
                    bags.values(),
                    bags.offsets(),
                    num_embeddings=max(a.lora_A.shape[0] for a in per_adapter if a is not None),  # new rows too
                    mode=mode,
                    per_sample_weights=bags.weights_or_none(),
                    include_last_offset=True,
                    weight_dtype=next(a.lora_A.dtype for a in per_adapter if a is not None),
                    table_name=f"{self.module_name}.{table}",
                    validate=False,  # the base lookup has read every id already
                )
                deltas[base_key] = dispatch.segmented_lora_bag_delta(
                    layout, per_adapter, sample_adapter, config.embedding_dim, torch.float32
                )
        return deltas

    def _routed_tables(self, routing) -> dict[str, list] | None:
        """{table: one AdapterWeights (or None) per routed name} for the adapted tables, or None
        when one is sharded. Kept while the routed names, the adapter collections, the B
        parameters and the scales are the same objects and values (a serving loop routes the
        same adapters call after call; sharding replaces the collections)."""
        # built with C-level maps: at hundreds of adapters a generator per entry was most of a
        # small batch's routing time (2.6 ms a call at 256 adapters × 5 tables)
        a_dicts, b_dicts = self.lora_A._modules, self.lora_B._modules

        def routed():  # (names this layer adapts, their {table: B_t}: no getattr per entry)
            names = [n for n in routing.adapter_names if n in a_dicts]
            return names, {n: b_dicts[n]._parameters for n in names}

        def key():
            names, factors = routed()
            modules_of = operator.attrgetter("_modules")
            return (
                routing.adapter_names,
                tuple(map(id, chain.from_iterable(map(dict.values, map(modules_of, map(a_dicts.__getitem__, names)))))),
                tuple(map(id, chain.from_iterable(map(dict.values, map(factors.__getitem__, names))))),
                tuple(map(tuple, map(dict.items, map(self.scaling.__getitem__, names)))),
            )

        def build():
            names, factors = routed()
            weights = {(n, t): self.adapter_table(n, t) for n in names for t in self.tables(n)}
            if any(type(w) is not torch.nn.Parameter for w in weights.values()):
                return None
            return {
                table: RoutedAdapters(
                    AdapterWeights(weights[n, table], factors[n][table], self.scaling[n][table], 0.0)
                    if (n, table) in weights
                    else None
                    for n in routing.adapter_names
                )
                for table in sorted({t for n, t in weights})
            }

        return self._routed_lists.get(routing, None, key, build)

    @property
    def _base_keys(self) -> dict[str, list[str]]:
        """Table → its features' keys in the base collection's output."""
        configs = self.table_configs(self.base_layer)
        return dict(zip([c.name for c in configs], get_embedding_names_by_table(configs)))

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
