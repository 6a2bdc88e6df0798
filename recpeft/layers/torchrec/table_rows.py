"""Rows of an embedding table that may be sharded across processes.

A torchrec collection exposes each table through its ``state_dict``: a plain tensor [V, D] when
unsharded, a ``ShardedTensor`` when ``DistributedModelParallel`` has sharded it. A table-wise or
row-wise sharded table is a set of *row blocks*: rows [start, start + n) held whole by one
process. Everything the LoRA collection layers do to a table — find the rows an adapter touched,
write rows, add a delta to rows — is written here once over row blocks, so the same code serves
the unsharded table (one block starting at row 0) and the sharded one (this process's blocks).

Reading rows of every process (:func:`gather_touched_rows`) is a collective: every process of the
table's process group must call it, in the same order. Column-wise shards are not row blocks
and are refused.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor


def row_blocks(weight: torch.Tensor, table_name: str) -> list[tuple[int, torch.Tensor]]:
    """(first global row, rows) of every block of ``weight`` this process holds; the tensors are
    views, so writing into them writes the table."""
    if isinstance(weight, ShardedTensor):
        blocks = []
        for shard in weight.local_shards():
            row0, col0 = shard.metadata.shard_offsets
            if col0 != 0 or shard.metadata.shard_sizes[1] != weight.size(1):
                raise ValueError(
                    f"{table_name}: this process holds columns [{col0}, {col0 + shard.metadata.shard_sizes[1]}) "
                    f"of the table; LoRA needs whole rows (table-wise, row-wise or table-row-wise sharding)"
                )
            blocks.append((int(row0), shard.tensor))
        return blocks
    if type(weight).__name__ == "DTensor":
        raise TypeError(
            f"{table_name}: tables stored as DTensor are not supported; use torchrec's default ShardedTensor state"
        )
    return [(0, weight)]


def is_sharded(weight: torch.Tensor) -> bool:
    return isinstance(weight, ShardedTensor)


def local_touched_rows(weight: torch.Tensor, table_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(global indices [n] int64, rows [n, D]) of the rows held here that are not all zero."""
    indices, rows = [], []
    for row0, block in row_blocks(weight, table_name):
        local = (block != 0).any(dim=1).nonzero().squeeze(1)
        indices.append(local + row0)
        rows.append(block.detach().index_select(0, local))
    if not indices:  # a sharded table none of whose rows live here
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, weight.size(1), dtype=weight.dtype)
    return torch.cat(indices), torch.cat(rows)


def gather_touched_rows(weight: torch.Tensor, table_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices, rows) of every non-zero row of the whole table, indices ascending. Collective
    for a sharded table: every process of its group receives the same result."""
    indices, rows = local_touched_rows(weight, table_name)
    if is_sharded(weight):
        group = weight._process_group
        pieces: list = [None] * dist.get_world_size(group)
        dist.all_gather_object(pieces, (indices.cpu(), rows.cpu()), group=group)
        indices = torch.cat([p[0] for p in pieces])
        rows = torch.cat([p[1] for p in pieces])
    order = torch.argsort(indices)
    return indices.index_select(0, order).cpu(), rows.index_select(0, order).cpu()


@torch.no_grad()
def write_rows(weight: torch.Tensor, indices: torch.Tensor, rows: torch.Tensor, table_name: str) -> None:
    """Set the table to zero except ``rows`` at ``indices``; each process writes its own blocks."""
    for row0, block in row_blocks(weight, table_name):
        inside = (indices >= row0) & (indices < row0 + block.shape[0])
        block.zero_()
        block.index_copy_(0, (indices[inside] - row0).to(block.device), rows[inside].to(block.device, block.dtype))


@torch.no_grad()
def add_to_rows(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, table_name: str) -> None:
    """weight[indices] += values for rows this process holds; every row must be held here
    (the caller adds rows it read from a table sharded the same way)."""
    placed = torch.zeros(indices.numel(), dtype=torch.bool)
    for row0, block in row_blocks(weight, table_name):
        inside = (indices >= row0) & (indices < row0 + block.shape[0])
        block.index_add_(0, (indices[inside] - row0).to(block.device), values[inside].to(block.device, block.dtype))
        placed |= inside.cpu()
    if not bool(placed.all()):
        missing = int(indices[~placed.to(indices.device)][0])
        raise ValueError(
            f"{table_name}: row {missing} is not held by this process; the adapter table and its base "
            f"table must be sharded with the same plan"
        )
