"""Tensor byte counts: dense, views, sparse COO (indices + values), ShardedTensor (its local
shards), non-tensors, and the storage-deduplicating total."""

import subprocess
import sys
import textwrap

import torch

from recpeft.utils.tensor_bytes import storage_bytes, tensor_bytes


def test_dense_views_and_non_tensors():
    table = torch.zeros(10, 4)
    assert tensor_bytes(table) == 10 * 4 * 4
    assert tensor_bytes(table[:3]) == 3 * 4 * 4  # a view counts its own elements
    assert tensor_bytes(torch.zeros(5, dtype=torch.float16)) == 10
    assert tensor_bytes(None) == 0 and tensor_bytes(7) == 0


def test_sparse_counts_indices_and_values_not_the_dense_shape():
    grad = torch.sparse_coo_tensor(
        torch.tensor([[1, 7, 7]]), torch.ones(3, 8), (1_000_000, 8), check_invariants=True
    )  # uncoalesced
    assert tensor_bytes(grad) == 1 * 3 * 8 + 3 * 8 * 4
    assert storage_bytes([grad]) == 3 * 8 + 3 * 8 * 4


def test_storage_bytes_counts_each_storage_once_and_whole():
    table = torch.zeros(10, 4)
    other = torch.zeros(3)
    seen = set()
    assert storage_bytes([table[:2], table, other, "step", None], seen) == 10 * 4 * 4 + 3 * 4
    assert storage_bytes([table[5:]], seen) == 0  # already counted through the shared set
    assert storage_bytes([table[5:]]) == 10 * 4 * 4  # a view counts its full storage


def test_sharded_tensor_counts_its_local_shards():
    code = textwrap.dedent("""
        import tempfile, torch, torch.distributed as dist
        from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards
        from recpeft.utils.tensor_bytes import storage_bytes, tensor_bytes
        with tempfile.NamedTemporaryFile() as f:
            dist.init_process_group("gloo", init_method=f"file://{f.name}", rank=0, world_size=1)
            a, b = torch.zeros(4, 3), torch.zeros(6, 3)
            st = init_from_local_shards([Shard(a, ShardMetadata([0, 0], [4, 3], "rank:0/cpu")),
                                         Shard(b, ShardMetadata([4, 0], [6, 3], "rank:0/cpu"))], 10, 3)
            print(tensor_bytes(st), storage_bytes([st, a]), storage_bytes([st, torch.zeros(2)]))
            dist.destroy_process_group()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    shards = 4 * 3 * 4 + 6 * 3 * 4
    assert done.stdout.split() == [str(shards), str(shards), str(shards + 8)]  # a shard counts once
