"""Sharded LoRA fine-tuning of a torchrec DLRM-DCN with DistributedModelParallel.

    torchrun --nproc_per_node 2 examples/train_sharded.py --output adapters/demo

Every process builds the same pretrained model (here: a seeded DLRM-DCN standing in for your
checkpoint), wraps it with LoRA adapters on its embedding tables and over-arch, and shards it:
base tables by the plan (row-wise by default, ``--plan table_wise`` or ``--plan auto`` for
torchrec's planner), adapter tables by the same plan, B matrices and linear adapters data-parallel.
Each process trains on its own slice of every batch; adapter tables are stepped by torchrec's
fused row-wise Adagrad inside backward, the rest by Adam. The adapter is saved once (process 0
writes), then process 0 loads it into an unsharded copy of the model and checks that both give
the same scores. CPU (gloo) or one GPU per process (nccl).
"""

from __future__ import annotations

import argparse
import logging
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DLRM_DCN
from torchrec.optim import RowWiseAdagrad

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.peft.distributed import dense_parameters, optimizer_state_bytes, save_adapters, shard_peft_model

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

DENSE_IN, DIM = 13, 16


def pretrained_model(num_tables: int, rows: int) -> nn.Module:
    torch.manual_seed(0)  # the same "checkpoint" on every process
    tables = [
        EmbeddingBagConfig(name=f"t_{i}", embedding_dim=DIM, num_embeddings=rows, feature_names=[f"f_{i}"])
        for i in range(num_tables)
    ]
    return DLRM_DCN(
        EmbeddingBagCollection(tables),
        dense_in_features=DENSE_IN,
        dense_arch_layer_sizes=[32, DIM],
        over_arch_layer_sizes=[32, 1],
        dcn_num_layers=2,
        dcn_low_rank_dim=8,
    )


def batch(step: int, size: int, num_tables: int, rows: int, rank: int, device: torch.device):
    """This process's samples of step ``step``: dense [B, 13], 1-3 ids per feature, click labels."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    lengths = torch.randint(1, 4, (num_tables * size,), generator=g)
    ids = torch.randint(0, rows, (int(lengths.sum()),), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync([f"f_{i}" for i in range(num_tables)], ids, lengths)
    dense = torch.randn(size, DENSE_IN, generator=g)
    labels = (dense[:, 0] + 0.1 * (ids[:size] % 7).float() > 0.5).float()
    return dense.to(device), kjt.to(device), labels.to(device)


def make_plan(kind: str, model: nn.Module, world: int, device: torch.device) -> ShardingPlan | None:
    if kind == "auto":
        return None
    ebc = model.sparse_arch.embedding_bag_collection
    per_table = {
        c.name: (row_wise() if kind == "row_wise" else table_wise(rank=i % world))
        for i, c in enumerate(ebc.embedding_bag_configs())
    }
    return ShardingPlan(
        {
            "sparse_arch.embedding_bag_collection": construct_module_sharding_plan(
                ebc,
                per_table,
                local_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)),
                world_size=world,
                device_type=device.type,
            )
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="adapters/sharded_demo")
    parser.add_argument("--plan", choices=["row_wise", "table_wise", "auto"], default="row_wise")
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=256, help="samples per process per step")
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    config = LoraConfig(
        r=8, lora_alpha=16, target_modules=["sparse_arch.embedding_bag_collection", "over_arch.model.1"]
    )
    pretrained = pretrained_model(args.tables, args.rows)
    plan = make_plan(args.plan, pretrained, world, device)  # the plan you would use for the plain model
    model = get_peft_model(pretrained, config)
    sharded = shard_peft_model(
        model,
        plan=plan,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=device,
        embedding_optimizer=(RowWiseAdagrad, {"lr": 0.05}),
    )
    optimizer = torch.optim.Adam(dense_parameters(sharded), lr=3e-3)
    if rank == 0:
        print(sharded.plan)

    for step in range(args.steps):
        dense, kjt, labels = batch(step, args.batch, args.tables, args.rows, rank, device)
        loss = F.binary_cross_entropy_with_logits(sharded(dense, kjt).squeeze(1), labels)
        optimizer.zero_grad()
        loss.backward()  # the adapter tables are stepped here, by the fused optimizer
        optimizer.step()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        if rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step:3d}  loss {mean_loss.item() / world:.4f}")

    state = optimizer_state_bytes(sharded, optimizer)
    if rank == 0:
        rows_total = args.tables * args.rows
        print(
            f"optimizer state, all processes: base tables {state['base_tables']:,} B, adapter tables "
            f"{state['adapter_tables']:,} B (row-wise Adagrad: 4 B per row, {rows_total:,} rows), "
            f"dense parameters {state['dense']:,} B (Adam, replicated per process)"
        )

    save_adapters(sharded, args.output)
    dense, kjt, _ = batch(10_000, 8, args.tables, args.rows, rank, device)
    with torch.no_grad():
        sharded_scores = sharded(dense, kjt).cpu()
    if rank == 0:
        unsharded = PeftModel.from_pretrained(pretrained_model(args.tables, args.rows), args.output)
        with torch.no_grad():
            scores = unsharded(dense.cpu(), kjt.to(torch.device("cpu")))
        gap = (scores - sharded_scores).abs().max().item()
        print(f"saved {args.output}; the unsharded model loaded from it scores within {gap:.2e} of the sharded one")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
