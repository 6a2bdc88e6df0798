"""Rows of an adapter's own for ids a torchrec collection's table has never seen.

The math of :mod:`recpeft.layers.new_rows`, table by table. An adapter with n_t new rows on table
t (E_t [V_t, D_t], new-id row k_t) owns ids V_t … V_t + n_t − 1 of every feature of t: its A_t
(the adapter collection's table) grows to [V_t + n_t, r_t], and the frozen collection looks those
ids up as row k_t:

    pooled_f[j] = Σ_{i∈I_fj} w_i·E_t[base(i)] + s_t·(Σ_{i∈I_fj} w_i·A_t[i])·B_t,
    base(i) = i for i < V_t, k_t for V_t ≤ i < V_t + n_t

(unpooled collections: one row per id, the same terms without the sum). An id past its own
adapter's rows raises an IndexError naming the table; routed samples each get their own
adapter's limit. Merging extends E_t to V_t + n_t rows (n_t copies of row k_t, then the delta on
the touched rows) and the table's config to V_t + n_t; unmerging shrinks both back. Tables that
DistributedModelParallel has sharded take no new rows.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recpeft.layers.new_rows import NewRows, base_ids, check_routed_ids, grown_table, resolve_new_id_row


class CollectionNewRows:
    """New-id rows per (adapter, table) of a :class:`~.collection.LoraCollectionLayer`:
    ``new_rows[adapter][table]``."""

    new_rows: dict[str, dict[str, NewRows]]

    @torch.no_grad()
    def add_table_new_rows(self, adapter: str, table: str, count: int, new_id_row: int = -1) -> None:
        """Give ``adapter`` ``count`` rows of its own on ``table`` for ids V … V + count − 1, each
        starting as the table's new-id row ``new_id_row`` (negative: from the end): A_t grows by
        ``count`` zero rows. Every adapter of a table names the same new-id row."""
        name = self._qualified(table)
        if table not in self.tables(adapter):
            raise ValueError(f"{name}: adapter {adapter!r} does not adapt this table; it adapts {self.tables(adapter)}")
        weight = self.adapter_table(adapter, table)
        if type(weight) is not nn.Parameter:
            raise ValueError(f"{name}: the table is sharded; new-id rows need an unsharded table")
        row = resolve_new_id_row(new_id_row, self._table_rows(self.base_layer, table), name)
        others = {per[table].new_id_row for a, per in self.new_rows.items() if a != adapter and table in per}
        if others - {row}:
            raise ValueError(f"{name}: new_id_row {row} but another adapter's new rows use {others.pop()}")
        collection = self.lora_A[adapter][self.group_for(self.ranks[adapter][table])]
        grown = torch.cat([weight.detach(), weight.new_zeros(count, weight.shape[1])])
        self._set_table(collection, table, nn.Parameter(grown))
        self.new_rows.setdefault(adapter, {})[table] = NewRows(count, row)

    def _drop_new_rows(self, adapter: str) -> None:
        self.new_rows.pop(adapter, None)

    # ---- tables ---------------------------------------------------------------------------------

    def _table_rows(self, collection: nn.Module, table: str) -> int:
        return next(c.num_embeddings for c in self.table_configs(collection) if c.name == table)

    def _set_table(self, collection: nn.Module, table: str, weight: nn.Parameter) -> None:
        """Replace ``table``'s weight in ``collection`` (its module and its config)."""
        module = getattr(collection, self.TABLE_ATTR)[table]
        module.weight = weight
        module.num_embeddings = weight.shape[0]
        next(c for c in self.table_configs(collection) if c.name == table).num_embeddings = weight.shape[0]

    def _resize_base_table(self, table: str, new: NewRows, sign: float) -> None:
        """Merging (sign > 0): E_t grows by the new ids' base rows; unmerging: shrinks back."""
        weight = self.base_table(table).detach()
        table_weight = grown_table(weight, new) if sign > 0 else weight[: -new.count].clone()
        self._set_table(self.base_layer, table, nn.Parameter(table_weight, requires_grad=False))

    def check_new_rows_merge(self, adapters: list[str]) -> None:
        """An adapter with new rows on a table merges alone among that table's adapters with new
        rows: its merge extends the table, and another's ids V + j would then name its rows."""
        for adapter in adapters:
            for table in self.new_rows.get(adapter, {}):
                owners = sorted(a for a, per in self.new_rows.items() if table in per)
                if len(owners) > 1:
                    raise ValueError(
                        f"{self._qualified(table)}: adapters {owners} all have new-id rows; merging "
                        f"{adapter!r} would extend the table under the others' ids (delete them first)"
                    )

    # ---- forward --------------------------------------------------------------------------------

    def _new_rows_in_play(self, routing) -> dict[str, list[tuple[str, NewRows]]]:
        """{table: [(adapter, its new rows)]} of the adapters this forward uses (routed, or
        active and unmerged); two unrouted adapters with new rows on one table are refused."""
        if not self.new_rows:
            return {}
        names = routing.adapter_names if routing is not None else self.pending_adapters()
        per_table: dict[str, list[tuple[str, NewRows]]] = {}
        for adapter in names:
            for table, new in self.new_rows.get(adapter, {}).items():
                per_table.setdefault(table, []).append((adapter, new))
        crowded = [t for t, owners in per_table.items() if len(owners) > 1]
        if routing is None and crowded:
            raise ValueError(
                f"{self._qualified(crowded[0])}: two active adapters have new-id rows of their own; "
                "activate one, or route each sample to its adapter"
            )
        return per_table

    def base_features(self, features: KeyedJaggedTensor, sample_adapter: torch.Tensor | None, routing):
        """``features`` as the frozen collection looks them up: on every table with new rows in
        play, ids past V_t become its new-id row, after checking each lies within its adapter's
        rows (each routed sample's own adapter; ``sample_adapter`` [B] its index, or None)."""
        in_play = self._new_rows_in_play(routing)
        if not in_play:
            return features
        table_of = {f: c for c in self.table_configs(self.base_layer) for f in c.feature_names}
        pieces = features.to_dict()
        values = []
        for key in features.keys():
            ids = pieces[key].values()
            config = table_of[key]
            owners = in_play.get(config.name)
            if owners is not None:
                name, rows = f"{self._qualified(config.name)} (feature {key!r})", config.num_embeddings
                self._check_new_ids(ids, pieces[key].lengths(), owners, rows, sample_adapter, routing, name)
                ids = base_ids(ids, rows, owners[0][1].new_id_row)
            values.append(ids)
        weights = features.weights_or_none()
        return KeyedJaggedTensor(
            keys=features.keys(),
            values=torch.cat(values) if values else features.values(),
            weights=None if weights is None else weights[: sum(v.numel() for v in values)],
            lengths=features.lengths(),
            stride=features.stride(),
        )

    @staticmethod
    def _check_new_ids(ids, lengths, owners, rows, sample_adapter, routing, name) -> None:
        """Every id below its owner's limit: V + n of the active adapter, or per routed sample
        V + n_a of its adapter (V for none): IndexError naming the table otherwise."""
        if sample_adapter is None:
            adapter, new = owners[0]
            check_routed_ids(ids, torch.zeros_like(ids), torch.tensor([rows, rows + new.count]), name, (adapter,))
            return
        counts = {a: n.count for a, n in owners}
        limits = torch.tensor([rows] + [rows + counts.get(a, 0) for a in routing.adapter_names])
        id_adapter = sample_adapter.to(ids.device).repeat_interleave(lengths.to(torch.int64))
        check_routed_ids(ids, id_adapter, limits, name, routing.adapter_names)
