"""torchrec DLRM fine-tuning, fp32 CPU: one LoRA training step against dense fine-tuning.

Model: torchrec's ``DLRM`` with 8 tables of 500,000 × 64 (1.02 GB of tables), dense arch
13 → 256 → 64, over arch → 512 → 256 → 1. Batch: 2048 samples, 4 uniform random ids per
feature (8 features), click labels; every step takes the next of ``NUM_BATCHES`` pre-drawn
batches (fresh ids, as in training). One step = forward, BCE loss, backward, optimizer step,
gradients cleared.

    dense_adam     (a) dense fine-tuning, torch.optim.Adam on every parameter (tables get dense
                       gradients) — the reference the targets are judged against
    dense_rowwise  (b) dense fine-tuning the torchrec way: tables under DistributedModelParallel
                       (1 process, table-wise) with torchrec's fused sparse row-wise Adagrad
                       applied in backward; Adam on the dense layers
    lora           (c) recpeft: get_peft_model(r=8, α=16) on every table and every linear layer,
                       unsharded; LoraAdamW (sparse rows for the adapter tables, Adam elsewhere)
    lora_rowwise   (d) recpeft sharded path: (c) through recpeft.peft.distributed.shard_peft_model
                       (1 process): adapter tables with torchrec's fused row-wise Adagrad, base
                       tables frozen without optimizer state, Adam on B and the linear adapters

Before anything is timed: all four start from the same pretrained model and give the same
scores on a batch (LoRA at init bit for bit), and one step of each changes them.

Memory (:mod:`recpeft.utils.memory_probe`): each variant in a fresh subprocess (``python
benchmarks/bench_torchrec.py --memory VARIANT``), read from the resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs): ``peak`` is the mark during three training steps
above the resident set before the model was built — what the fine-tuning job holds for model,
gradients, optimizer state and activations; ``model`` the resident growth once the model is built
(and wrapped or sharded); ``training`` = peak − model. ``build_peak`` is the mark while
building: the DMP variants (b, d) build the unsharded model and then shard it, so both copies
exist for a moment (torchrec's way around that is building on the meta device, which this
benchmark does not do); it is reported apart from ``peak``. glibc serves allocations over
128 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed blocks leave the resident set.

Targets (reported, not asserted): lora samples/s ≥ 2x dense_adam (step time ratio ≤ 0.5), lora
peak memory ≤ 0.5x dense_adam.
"""

from __future__ import annotations

import copy
import gc
import json
import logging
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.models.dlrm import DLRM
from torchrec.optim import RowWiseAdagrad

from recpeft import LoraAdamW, LoraConfig, get_peft_model
from recpeft.peft.distributed import copy_full_state, dense_parameters, shard_peft_model
from recpeft.utils.memory_probe import (
    can_measure_memory,
    describe_peak_memory,
    measure_peak_memory,
    run_json_subprocesses,
)

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

NUM_TABLES, ROWS, DIM = 8, 500_000, 64
DENSE_IN, DENSE_ARCH, OVER_ARCH = 13, [256, DIM], [512, 256, 1]
BATCH, IDS_PER_FEATURE, NUM_BATCHES = 2048, 4, 4
R, ALPHA = 8, 16
LR, EMB_LR = 1e-3, 0.05
ROUNDS = {"dense_adam": 4, "dense_rowwise": 15, "lora": 15, "lora_rowwise": 15}
INTERLEAVED_ROUNDS = 4
MEMORY_STEPS = 3
EBC_PATH = "sparse_arch.embedding_bag_collection"

SUITE = {
    "name": "torchrec",
    "title": f"torchrec DLRM fine-tuning step, fp32, {NUM_TABLES} tables {ROWS:,} x {DIM}, batch {BATCH} x "
    f"{IDS_PER_FEATURE} ids/feature, LoRA r={R}",
    "shape": {
        "tables": NUM_TABLES,
        "rows": ROWS,
        "dim": DIM,
        "batch": BATCH,
        "ids_per_feature": IDS_PER_FEATURE,
        "dense_in": DENSE_IN,
        "dense_arch": DENSE_ARCH,
        "over_arch": OVER_ARCH,
        "r": R,
        "lora_alpha": ALPHA,
    },
    "dtype": "float32",
    "floor": "dense_adam",
    "targets": {"lora": 0.5},
    "anchors": {},
}
VARIANTS = list(ROUNDS)
LABELS = {
    "dense_adam": "(a) dense fine-tuning, Adam on all parameters",
    "dense_rowwise": "(b) dense, torchrec fused row-wise Adagrad tables + Adam",
    "lora": "(c) recpeft LoRA r=8, LoraAdamW",
    "lora_rowwise": "(d) recpeft LoRA via shard_peft_model, fused row-wise Adagrad",
}


# ---- model, data, variants ----------------------------------------------------------------------


def pretrained() -> DLRM:
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=f"t_{i}", embedding_dim=DIM, num_embeddings=ROWS, feature_names=[f"f_{i}"])
        for i in range(NUM_TABLES)
    ]
    return DLRM(
        EmbeddingBagCollection(tables),
        dense_in_features=DENSE_IN,
        dense_arch_layer_sizes=DENSE_ARCH,
        over_arch_layer_sizes=OVER_ARCH,
    )


def make_batches():
    g = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(NUM_BATCHES):
        ids = torch.randint(0, ROWS, (NUM_TABLES * BATCH * IDS_PER_FEATURE,), generator=g)
        lengths = torch.full((NUM_TABLES * BATCH,), IDS_PER_FEATURE)
        kjt = KeyedJaggedTensor.from_lengths_sync([f"f_{i}" for i in range(NUM_TABLES)], ids, lengths)
        dense = torch.randn(BATCH, DENSE_IN, generator=g)
        batches.append((dense, kjt, (torch.rand(BATCH, generator=g) < 0.3).float()))
    return batches


def table_wise_plan(ebc: EmbeddingBagCollection) -> ShardingPlan:
    per_table = {c.name: table_wise(rank=0, compute_kernel="fused") for c in ebc.embedding_bag_configs()}
    return ShardingPlan(
        {EBC_PATH: construct_module_sharding_plan(ebc, per_table, local_size=1, world_size=1, device_type="cpu")}
    )


def build(name: str, model: nn.Module):
    """(model to call, optimizer over its non-fused parameters) for variant ``name``; ``model``
    is the pretrained DLRM, consumed."""
    if name == "dense_adam":
        return model, torch.optim.Adam(model.parameters(), lr=LR)
    env = ShardingEnv.from_process_group(dist.group.WORLD) if dist.is_initialized() else None
    if name == "dense_rowwise":
        plan = table_wise_plan(model.sparse_arch.embedding_bag_collection)
        from torch.distributed.optim import _apply_optimizer_in_backward

        _apply_optimizer_in_backward(
            RowWiseAdagrad, model.sparse_arch.embedding_bag_collection.parameters(), {"lr": EMB_LR}
        )
        state = model.state_dict()
        sharded = DistributedModelParallel(model, env=env, plan=plan)
        copy_full_state(sharded, state)
        return sharded, torch.optim.Adam(dense_parameters(sharded), lr=LR)
    plan = table_wise_plan(model.sparse_arch.embedding_bag_collection)
    peft = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[EmbeddingBagCollection, nn.Linear]))
    if name == "lora":
        return peft, LoraAdamW([p for p in peft.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    if name == "lora_rowwise":
        sharded = shard_peft_model(peft, plan=plan, env=env, embedding_optimizer=(RowWiseAdagrad, {"lr": EMB_LR}))
        return sharded, torch.optim.Adam(dense_parameters(sharded), lr=LR)
    raise ValueError(name)


def train_step(model, optimizer, batch) -> torch.Tensor:
    dense, kjt, labels = batch
    loss = F.binary_cross_entropy_with_logits(model(dense, kjt).squeeze(1), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def init_single_process_group() -> None:
    """torchrec's sharded modules need a process group, even of one process."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# ---- timing -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def case(bench):
    init_single_process_group()
    batches = make_batches()
    base = pretrained()
    with torch.no_grad():
        expected = base(*batches[0][:2])
    built = {name: build(name, copy.deepcopy(base)) for name in VARIANTS}
    del base
    gc.collect()

    # ---- the variants start from the same model, checked before anything is timed ----
    with torch.no_grad():
        scores = {name: model(*batches[0][:2]) for name, (model, _) in built.items()}
    assert torch.equal(scores["lora"], expected), "LoRA at init must score exactly as the pretrained model"
    for name, got in scores.items():
        bench.assert_close(f"{name} scores at start", got, expected, tol=1e-5)
    for name, (model, optimizer) in built.items():
        train_step(model, optimizer, batches[1])
        with torch.no_grad():
            moved = (model(*batches[0][:2]) - expected).abs().max().item()
        assert moved > 1e-4, f"{name}: one training step did not change the scores"
    lora_table = built["lora"][0].base_model.sparse_arch.embedding_bag_collection
    assert all(not p.requires_grad for p in lora_table.base_layer.parameters())

    order = {name: iter(range(10**9)) for name in VARIANTS}

    def step(name):
        model, optimizer = built[name]

        def run():
            train_step(model, optimizer, batches[next(order[name]) % NUM_BATCHES])

        return run

    return {name: bench.Variant(LABELS[name], step(name)) for name in VARIANTS}


def test_variants_agree(case):
    """The check itself runs in the ``case`` fixture, before any timing."""
    assert set(case) == set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_torchrec_step(benchmark, report, case, name):
    report.time(benchmark, name, case[name], rounds=ROUNDS[name], warmup_rounds=1)


def test_torchrec_step_interleaved(request, bench, report, case):
    bench.skip_if_not_timing(request.config)
    report.time_interleaved(case, rounds=INTERLEAVED_ROUNDS)


# ---- memory, each variant in a fresh process ------------------------------------------------------


def memory_probe(name: str) -> dict:
    """Run in a fresh process: peak resident memory of building ``name`` and training it."""
    init_single_process_group()
    batches = make_batches()
    result = measure_peak_memory(
        lambda: build(name, pretrained()),
        lambda built, step: train_step(*built, batches[step % NUM_BATCHES]),
        MEMORY_STEPS,
    )
    return {"variant": name, **result}


def run_memory_probes() -> dict:
    """Every variant's :func:`memory_probe`, each in its own fresh process, one after another
    (side by side the four would hold about 10 GB at once)."""
    return {name: run_json_subprocesses([[sys.executable, __file__, "--memory", name]])[0] for name in VARIANTS}


def test_torchrec_peak_memory_and_throughput(request, bench, report):
    bench.skip_if_not_timing(request.config)
    if not can_measure_memory():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the resident-set high-water mark")
    probes = run_memory_probes()
    # per variant: the interleaved quiet median when there is one, else pytest-benchmark's median
    step_s = {name: report.interleaved.get(name, report.medians.get(name)) for name in VARIANTS}
    sources = {name: "interleaved" if name in report.interleaved else "pytest-benchmark" for name in VARIANTS}
    gib = 2**30
    rows = {}
    print(
        f"\n{'variant':<62} {'samples/s':>10} {'peak GiB':>9} {'model GiB':>10} {'training GiB':>13} "
        f"{'build peak GiB':>15}"
    )
    for name in VARIANTS:
        probe = probes[name]
        rate = BATCH / step_s[name] if step_s[name] else None
        rows[name] = {
            **probe,
            "samples_per_s": round(rate, 1) if rate else None,
            "step_ms": round(step_s[name] * 1e3, 2) if step_s[name] else None,
        }
        print(
            f"{LABELS[name]:<62} {rate or float('nan'):>10.0f} {probe['peak_bytes'] / gib:>9.3f} "
            f"{probe['model_bytes'] / gib:>10.3f} {probe['training_bytes'] / gib:>13.3f} "
            f"{probe['build_peak_bytes'] / gib:>15.3f}"
        )
    dense, lora = rows["dense_adam"], rows["lora"]
    speed = lora["samples_per_s"] / dense["samples_per_s"] if lora["samples_per_s"] and dense["samples_per_s"] else None
    memory = lora["peak_bytes"] / dense["peak_bytes"]
    verdicts = {
        "lora_samples_per_s_over_dense_adam": {
            "measured": round(speed, 3) if speed else None,
            "target_min": 2.0,
            "met": bool(speed and speed >= 2.0),
        },
        "lora_peak_memory_over_dense_adam": {"measured": round(memory, 3), "target_max": 0.5, "met": memory <= 0.5},
    }
    for key, verdict in verdicts.items():
        print(f"target {key}: {verdict['measured']} -> {'MET' if verdict['met'] else 'NOT MET'}")
    report.extra["per_variant"] = rows
    report.extra["targets_throughput_memory"] = verdicts
    report.extra["memory_method"] = describe_peak_memory(MEMORY_STEPS)
    report.extra["samples_per_s_from"] = sources


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(memory_probe(sys.argv[2])))
    else:
        sys.exit("usage: python benchmarks/bench_torchrec.py --memory VARIANT")
