"""What the LoRA wrappers of torchrec's EmbeddingBagCollection and EmbeddingCollection share.

A collection holds tables E_t [V_t, D_t], each looked up by one or more features of a
``KeyedJaggedTensor``. An adapter targets some of the tables. For a targeted table t it holds

    A_t [V_t, r_t]  itself a table of dimension r_t over the same features (an adapter collection
                    built from EmbeddingBagConfig / EmbeddingConfig of dimension r_t), and
    B_t [r_t, D_t]  a small dense parameter,  s_t = α/r_t its scale,

and every feature f of table t gets, per sample j (bag I_fj, per-id weights w_i):

    pooled (EBC):    out_f[j] = Σ_{i∈I_fj} w_i·E_t[i] + s_t·(Σ_{i∈I_fj} w_i·A_t[i])·B_t
    unpooled (EC):   out_f[k] = E_t[i_k] + s_t·A_t[i_k]·B_t          (one row per id)

The rank-space pooling Σ w_i·A_t[i] is the adapter collection's own lookup (sum or mean pooling,
weighted or not, exactly as the base table pools), so the adapter costs r_t/D_t of the base
gather plus one [B, r_t]×[r_t, D_t] product per feature. The base collection is frozen: it runs
without autograd (unless the KJT's per-id weights need a gradient), so it holds no gradient and
needs no optimizer state.

Addressing: the tables are the module's *parts*; target ``"<module>.<table>"`` (or a suffix of
it such as the table name alone), or the module itself for all its tables. ``rank_pattern`` and
``alpha_pattern`` match ``"<module>.<table>"``. Adapter files key tensors by
``"<module>.<table>.lora_embedding_A.{indices,rows,shape}"`` / ``"...lora_embedding_B.weight"``,
the names :mod:`recpeft.layers.table` uses for ``nn.Embedding``.

A starts at zero and B ~ N(0, 1), so the output equals the base output bit for bit at first,
rows of A no batch touched stay exactly zero, merging adds s·A[rows]·B to the touched rows of E
only, and the file stores only the touched rows.

Sharding (:mod:`recpeft.peft.distributed`): ``DistributedModelParallel`` shards ``base_layer`` and every
adapter collection (``lora_A.<adapter>.<group>``) with the same plan, table by table, so row i of
A_t lives in the same process as row i of E_t. Every operation on A and E goes through
:mod:`.table_rows`, which sees this process's row blocks; saving gathers the touched rows.

Per-sample routing: the KJT's stride is the batch; sample j uses adapter a_j (or none): each
adapter's collection looks up only its own samples' ids (the other samples' bags are emptied), so
its gradient touches only rows its samples used.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torchrec.distributed.types import Awaitable
from torchrec.modules.embedding_modules import get_embedding_names_by_table
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recpeft.layers.adapter_holder import sparse_embedding_weights
from recpeft.layers.adapter_state import split_by_prefix
from recpeft.layers.base import AdapterFactors, LoraLayer, check_factors, merge_product
from recpeft.layers.routing import RoutedListCache
from recpeft.layers.table import A_DENSE, A_INDICES, A_ROWS, B_WEIGHT, check_encoded_adapter, encode_rows

from . import table_rows
from .collection_new_rows import CollectionNewRows


@dataclass(frozen=True)
class FeatureLookup:
    """One feature of one adapted table: where its base output and its adapter lookup live."""

    feature: str  # the feature's key in the input KJT
    base_key: str  # its key in the base collection's output
    group: str  # the adapter collection that looks it up (``lora_A[adapter][group]``)
    adapter_key: str  # its key in that collection's output
    table: str


def resolved(output):
    """The value of a sharded module's output (it returns an awaitable), else ``output``."""
    return output.wait() if isinstance(output, Awaitable) else output


def keep_samples(features: KeyedJaggedTensor, keep: torch.Tensor) -> KeyedJaggedTensor:
    """``features`` with the bags of samples where ``keep`` [B] is False emptied (same keys and
    stride, so outputs stay one row per sample)."""
    lengths = features.lengths().to(torch.int64)
    keep_bag = keep.repeat(len(features.keys()))  # lengths are key-major: [F·B]
    keep_id = keep_bag.repeat_interleave(lengths)
    total = keep_id.numel()
    weights = features.weights_or_none()
    return KeyedJaggedTensor(
        keys=features.keys(),
        values=features.values()[:total][keep_id],
        weights=None if weights is None else weights[:total][keep_id],
        lengths=torch.where(keep_bag, lengths, 0).to(features.lengths().dtype),
        stride=features.stride(),
    )


class LoraCollectionLayer(CollectionNewRows, LoraLayer):
    """Shared part of :class:`LoraEmbeddingBagCollection` and :class:`LoraEmbeddingCollection`:
    the per-table family of LoRA wrappers (sibling of :class:`~recpeft.layers.weight.LoraWeightLayer`).

    Per adapter: ``lora_A[adapter]`` a ModuleDict {group: adapter collection of dimension r}
    holding A_t, ``lora_B[adapter]`` a ParameterDict {table: B_t [r_t, D_t]}, and per table its
    scale ``scaling[adapter][table]`` and rank ``ranks[adapter][table]``.

    Subclasses name the base collection's tables (``table_configs``, ``TABLE_ATTR``), build an
    adapter collection (``make_adapter_collection``), group tables into adapter collections
    (``group_for``) and compute each adapter's per-feature output deltas (``adapter_deltas``).
    """

    TABLE_ATTR = ""  # the collection's ModuleDict of tables ("embedding_bags" / "embeddings")

    def __init__(self, base_layer: nn.Module, module_name: str):
        super().__init__(base_layer, module_name)
        self.lora_A = nn.ModuleDict()  # adapter → ModuleDict{group: adapter collection of dim r}
        self.lora_B = nn.ModuleDict()  # adapter → ParameterDict{table: B_t [r_t, D_t]}
        self.scaling: dict[str, dict[str, float]] = {}  # adapter → {table: s_t}
        self.ranks: dict[str, dict[str, int]] = {}  # adapter → {table: r_t}
        self.lookups: dict[str, list[FeatureLookup]] = {}
        self._routed_lists = RoutedListCache()
        self.new_rows = {}  # adapter → {table: NewRows} (collection_new_rows)

    # ---- subclass interface --------------------------------------------------------------------

    @staticmethod
    def table_configs(module: nn.Module) -> list:
        raise NotImplementedError

    @staticmethod
    def group_for(rank: int) -> str:
        """Name of the adapter collection holding the tables of rank ``rank``."""
        raise NotImplementedError

    def make_adapter_collection(self, configs: list) -> nn.Module:
        raise NotImplementedError

    def adapter_deltas(
        self, adapter: str, features: KeyedJaggedTensor, keep: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """{base output key: s_t·(lookup of A_t)·B_t} for ``adapter`` on ``features``; with
        ``keep`` [B] (routing) only the kept samples' ids are looked up (:func:`keep_samples`) and
        the other samples get zero."""
        raise NotImplementedError

    def segmented_deltas(
        self, features: KeyedJaggedTensor, sample_adapter: torch.Tensor, routing
    ) -> dict[str, torch.Tensor] | None:
        """The routed deltas in one segmented call per adapted feature (every routed adapter at
        once), or None where this collection computes them adapter by adapter (the default)."""
        return None

    # ---- parts (tables) ------------------------------------------------------------------------

    @classmethod
    def part_names(cls, module: nn.Module) -> list[str]:
        return [config.name for config in cls.table_configs(module)]

    @classmethod
    def check_supported(cls, module: nn.Module, name: str) -> None:
        dotted = [c.name for c in cls.table_configs(module) if "." in c.name]
        if dotted:
            raise ValueError(
                f"{name}: table name {dotted[0]!r} holds a '.', so it cannot be addressed as '<module>.<table>'"
            )

    def tables(self, adapter: str) -> list[str]:
        return list(self.lora_B[adapter].keys())

    # ---- adapters ------------------------------------------------------------------------------

    def adapter_names(self) -> list[str]:
        return list(self.lora_A)

    def has_adapter(self, adapter: str) -> bool:
        return adapter in self.lora_A

    def adapter_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The adapter collections' tables A_t and every B_t."""
        return [*self.lora_A[adapter].parameters(), *self.lora_B[adapter].parameters()]

    def sparse_parameters(self, adapter: str) -> list[nn.Parameter]:
        """The tables A_t of the unsharded adapter collections (their lookups are ``sparse=True``);
        none once DistributedModelParallel has replaced them with fused kernels."""
        return sparse_embedding_weights(self.lora_A[adapter])

    def update_layer(self, adapter, r, scale, dropout, init):
        """The collection as a whole: every table at rank r (no dropout: torchrec lookups have none)."""
        self.update_parts(adapter, {c.name: (r, scale) for c in self.table_configs(self.base_layer)}, init)

    def update_parts(self, adapter: str, parts: dict[str, tuple[int, float]], init) -> None:
        configs = {c.name: c for c in self.table_configs(self.base_layer)}
        unknown = sorted(parts.keys() - configs.keys())
        if unknown:
            raise ValueError(f"{self.module_name}: no table {unknown[0]!r}; tables: {sorted(configs)}")
        grouped: dict[str, list] = {}
        lora_B = nn.ParameterDict()
        for table, (r, _) in parts.items():
            base = configs[table]
            init_a = nn.init.zeros_ if init is not False else partial(nn.init.normal_, std=1.0 / r)
            adapter_config = type(base)(
                name=base.name,
                num_embeddings=base.num_embeddings,
                embedding_dim=r,
                feature_names=list(base.feature_names),
                init_fn=init_a,
                **({"pooling": base.pooling} if hasattr(base, "pooling") else {}),
            )
            grouped.setdefault(self.group_for(r), []).append(adapter_config)
            lora_B[table] = nn.Parameter(torch.empty(r, base.embedding_dim, device=self._device()))
        self.lora_A[adapter] = nn.ModuleDict({g: self.make_adapter_collection(cs) for g, cs in grouped.items()})
        self.lora_B[adapter] = lora_B
        self.scaling[adapter] = {t: float(s) for t, (_, s) in parts.items()}
        self.ranks[adapter] = {t: r for t, (r, _) in parts.items()}
        self.lookups[adapter] = self._feature_lookups(grouped)
        with torch.no_grad():
            self.reset_adapter(adapter, init)

    def _device(self) -> torch.device:
        return next(self.base_layer.parameters()).device

    def _feature_lookups(self, grouped: dict[str, list]) -> list[FeatureLookup]:
        base_configs = self.table_configs(self.base_layer)
        base_names = dict(zip([c.name for c in base_configs], get_embedding_names_by_table(base_configs)))
        lookups = []
        for group, configs in grouped.items():
            for config, names in zip(configs, get_embedding_names_by_table(configs)):
                for feature, base_key, adapter_key in zip(config.feature_names, base_names[config.name], names):
                    lookups.append(FeatureLookup(feature, base_key, group, adapter_key, config.name))
        return lookups

    def reset_adapter(self, adapter, init):
        """A zero (random with ``init=False``), B ~ N(0, 1)."""
        for table in self.tables(adapter):
            nn.init.normal_(self.lora_B[adapter][table])
            weight = self.adapter_table(adapter, table)
            for _, block in table_rows.row_blocks(weight, self._qualified(table)):
                if init is False:
                    nn.init.normal_(block, std=1.0 / block.shape[1])
                else:
                    block.zero_()

    def drop_adapter(self, adapter):
        for store in (self.lora_A, self.lora_B):
            if adapter in store:
                del store[adapter]
        for settings in (self.scaling, self.ranks, self.lookups):
            settings.pop(adapter, None)  # absent when update_parts failed before making them
        self._drop_new_rows(adapter)

    def extra_repr(self) -> str:
        return f"name={self.module_name!r}, adapters={self.ranks}, active={self.active_adapters}"

    # ---- tables ---------------------------------------------------------------------------------

    def _qualified(self, table: str) -> str:
        return f"{self.module_name}.{table}"

    @classmethod
    def _table_tensor(cls, collection: nn.Module, table: str) -> torch.Tensor:
        """The table's weight as the collection's state_dict holds it: the parameter itself
        (unsharded) or a ShardedTensor over views of this process's shards."""
        return collection.state_dict(keep_vars=True)[f"{cls.TABLE_ATTR}.{table}.weight"]

    def adapter_table(self, adapter: str, table: str) -> torch.Tensor:
        group = self.group_for(self.ranks[adapter][table])
        collection = self.lora_A[adapter][group]
        tables = getattr(collection, self.TABLE_ATTR, None)  # unsharded: the table module's own weight
        module = tables[table] if isinstance(tables, nn.ModuleDict) and table in tables else None
        if type(module) in (nn.EmbeddingBag, nn.Embedding) and type(module.weight) is nn.Parameter:
            return module.weight
        return self._table_tensor(collection, table)  # sharded: a ShardedTensor of this process's rows

    def base_table(self, table: str) -> torch.Tensor:
        return self._table_tensor(self.base_layer, table)

    def untouched_parameters(self, adapter: str) -> int:
        """Entries of the adapter tables (held here) whose rows training has not touched."""
        total = 0
        for table in self.tables(adapter):
            weight = self.adapter_table(adapter, table)
            touched, _ = table_rows.local_touched_rows(weight, self._qualified(table))
            held = sum(block.shape[0] for _, block in table_rows.row_blocks(weight, self._qualified(table)))
            total += (held - touched.numel()) * self.ranks[adapter][table]
        return total

    # ---- forward --------------------------------------------------------------------------------

    def base_forward(self, features: KeyedJaggedTensor):
        """The frozen collection's output, computed without autograd unless the per-id weights
        need a gradient (the tables themselves never get one); ids of new rows in play look up
        their table's new-id row (:meth:`base_features`)."""
        if self.new_rows:
            routing = self.active_routing()
            device = features.values().device
            samples = None if routing is None else routing.row_adapter(self.module_name, features.stride(), 1, device)
            features = self.base_features(features, samples, routing)
        weights = features.weights_or_none()
        track = torch.is_grad_enabled() and weights is not None and weights.requires_grad
        with torch.set_grad_enabled(track):
            return resolved(self.base_layer(features))

    def feature_deltas(self, features: KeyedJaggedTensor) -> dict[str, torch.Tensor]:
        """Σ over the active (or routed) adapters of each adapted feature's delta."""
        routing = self.active_routing()
        if routing is not None:
            self.refuse_routing_when_merged()
            if features.variable_stride_per_key():
                raise ValueError(f"{self.module_name}: per-sample routing needs one stride (batch) for every key")
            sample_adapter = routing.row_adapter(self.module_name, features.stride(), 1, features.values().device)
            segmented = self.segmented_deltas(features, sample_adapter, routing)
            if segmented is not None:
                return segmented
            runs = [
                (name, sample_adapter == index)
                for index, name in enumerate(routing.adapter_names)
                if self.has_adapter(name)
            ]
        else:
            runs = [(name, None) for name in self.pending_adapters()]
        deltas: dict[str, torch.Tensor] = {}
        for adapter, keep in runs:
            for key, delta in self.adapter_deltas(adapter, features, keep).items():
                deltas[key] = deltas[key] + delta if key in deltas else delta
        return deltas

    # ---- merging --------------------------------------------------------------------------------

    def check_merge(self, adapters):
        super().check_merge(adapters)
        self.check_new_rows_merge(adapters)

    def merge_delta(self, adapter, sign):
        """E_t[i] += sign·s_t·A_t[i]·B_t for every touched row i (the rows held here); a table
        with the adapter's new rows grows first (merging) or shrinks after (unmerging)."""
        for table in self.tables(adapter):
            name = self._qualified(table)
            new = self.new_rows.get(adapter, {}).get(table)
            if new is not None and sign > 0:
                self._resize_base_table(table, new, sign)
            indices, rows = table_rows.local_touched_rows(self.adapter_table(adapter, table), name)
            b, base = self.lora_B[adapter][table], self.base_table(table)
            delta = merge_product(rows.to(b.device), b, sign * self.scaling[adapter][table], base.dtype)
            table_rows.add_to_rows(base, indices, delta, name)
            if new is not None and sign < 0:
                self._resize_base_table(table, new, sign)

    # ---- factors --------------------------------------------------------------------------------

    def adapter_factors(self, adapter):
        """{table: A_t's touched rows with their indices, B_t, s_t}; collective when sharded."""
        out = {}
        for table in self.tables(adapter):
            indices, rows = table_rows.gather_touched_rows(self.adapter_table(adapter, table), self._qualified(table))
            b = self.lora_B[adapter][table].detach()
            out[table] = AdapterFactors(rows.to(b.device), b, self.scaling[adapter][table], indices.to(b.device))
        return out

    @torch.no_grad()
    def set_adapter_factors(self, adapter, factors):
        """A_t ← zero but the listed rows (each process its own blocks), B_t ← B_t."""
        expected = {
            t: ((None, self.ranks[adapter][t]), self.lora_B[adapter][t].shape, self.scaling[adapter][t])
            for t in self.tables(adapter)
        }
        check_factors(self.module_name, factors, expected)
        for table, f in factors.items():
            weight = self.adapter_table(adapter, table)
            table_rows.write_rows(weight, f.rows.cpu(), f.lora_A.cpu(), self._qualified(table))
            self.lora_B[adapter][table].copy_(f.lora_B)

    # ---- on disk --------------------------------------------------------------------------------

    def export_adapter(self, adapter):
        """Per table: the touched rows of A with their indices (A whole when that is smaller),
        and B. Collective when the tables are sharded."""
        out = {}
        for table in self.tables(adapter):
            weight = self.adapter_table(adapter, table)
            indices, rows = table_rows.gather_touched_rows(weight, self._qualified(table))
            shape = (weight.size(0), weight.size(1))
            out.update({f"{table}.{k}": v for k, v in encode_rows(indices, rows, shape).items()})
            out[f"{table}.{B_WEIGHT}"] = self.lora_B[adapter][table].detach()
        return out

    def check_adapter_state(self, adapter, tensors, source):
        """Every key under a table the adapter adapts, then each table's tensors in either on-disk
        form (:func:`~recpeft.layers.table.check_encoded_adapter`)."""
        tables = self.tables(adapter)
        per_table = split_by_prefix(
            tensors,
            [f"{t}." for t in tables],
            source=source,
            shown=f"{self.module_name}.",
            hint=f"adapter {adapter!r} adapts tables {sorted(tables)}",
        )
        for table in tables:
            weight = self.adapter_table(adapter, table)
            check_encoded_adapter(
                per_table[f"{table}."],
                (weight.size(0), weight.size(1)),
                self.lora_B[adapter][table].shape,
                source=source,
                name=self._qualified(table),
            )

    @torch.no_grad()
    def load_adapter_state(self, adapter, tensors):
        for table in self.tables(adapter):
            weight = self.adapter_table(adapter, table)
            dense = tensors.get(f"{table}.{A_DENSE}")
            if dense is not None:
                indices = torch.arange(dense.shape[0])
                rows = dense
            else:
                indices, rows = tensors[f"{table}.{A_INDICES}"], tensors[f"{table}.{A_ROWS}"]
            table_rows.write_rows(weight, indices, rows, self._qualified(table))
            self.lora_B[adapter][table].copy_(tensors[f"{table}.{B_WEIGHT}"])
