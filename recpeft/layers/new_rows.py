"""Rows of an adapter's own for ids the base table has never seen (a new market's customers).

A frozen table E [V, D] keeps one row for every unseen id, the *new-id row* k (the encoder's
reserved id, or a model's "unknown" row, trained to stand for an id it has not seen). An adapter
with n new rows extends the table to V + n ids: id V + j (j < n) is the segment's j-th new id.
Its A grows to [V + n, r], and the looked-up row of id i is

    row(i) = E[i] + s·A[i]·B        (i < V)
    row(i) = E[k] + s·A[i]·B        (V ≤ i < V + n)

so a new id starts as the new-id row (A[i] = 0) and learns its own rank-r offset, stored
sparsely with A's other touched rows. Merging writes the rows into a table extended to V + n
rows (E[V + j] = E[k] + s·A[V + j]·B); unmerging removes them again. One table holds at most
one adapter's new rows merged at a time: two adapters' id V + j name different ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NewRows:
    """An adapter's new rows on one table: ``count`` ids V … V + count − 1, whose base row is
    ``new_id_row`` (an index in [0, V))."""

    count: int
    new_id_row: int


def resolve_new_id_row(new_id_row: int, num_embeddings: int, name: str) -> int:
    """``new_id_row`` as an index in [0, V) (negative counts from the end: −1 is the last row);
    ValueError naming the table otherwise."""
    index = new_id_row + num_embeddings if new_id_row < 0 else new_id_row
    if not 0 <= index < num_embeddings:
        raise ValueError(f"{name}: new_id_row {new_id_row} is not a row of the table's {num_embeddings}")
    return index


def base_ids(ids: torch.Tensor, num_embeddings: int, new_id_row: int) -> torch.Tensor:
    """``ids`` with every id ≥ V (a new row's) replaced by the new-id row: what the frozen table
    looks up."""
    return torch.where(ids >= num_embeddings, torch.full_like(ids, new_id_row), ids)


def check_routed_ids(
    ids: torch.Tensor, id_adapter: torch.Tensor, limits: torch.Tensor, table_name: str, adapter_names
) -> None:
    """Raise IndexError naming the table, the first id past its own adapter's rows and that
    adapter, unless ``ids[t] < limits[id_adapter[t] + 1]`` for every t. ``id_adapter``: the
    routed adapter index of each id (−1: none); ``limits`` [1 + adapters]: V for no adapter,
    then V + n_a per routed adapter."""
    if ids.numel() == 0:
        return
    limit = limits.to(ids.device).index_select(0, (id_adapter.to(torch.int64) + 1).reshape(-1))
    over = ids.reshape(-1).to(torch.int64) >= limit
    if bool(over.any()):
        position = int(over.nonzero()[0, 0])
        adapter = int(id_adapter.reshape(-1)[position])
        owner = f"adapter {adapter_names[adapter]!r}" if adapter >= 0 else "the base (no adapter)"
        raise IndexError(
            f"{table_name}: id {int(ids.reshape(-1)[position])} at position {position} is past the "
            f"{int(limit[position])} rows of {owner}: new-id rows belong to the adapter that made them"
        )


def grown_table(weight: torch.Tensor, new: NewRows) -> torch.Tensor:
    """[V + n, D]: ``weight`` with n copies of its new-id row appended (the new ids' base rows)."""
    return torch.cat([weight, weight[new.new_id_row].expand(new.count, -1)], dim=0)
