"""Sharded LoRA training on the CPU: 2 processes (gloo, torch.multiprocessing.spawn) train a
torchrec DLRM through DistributedModelParallel, table-wise and row-wise, on the same data as a
single unsharded process; per-step losses, final adapters and outputs agree; adapters saved from
the sharded model load into an unsharded one and the other way round; base tables hold no
optimizer state; merging into sharded tables is local and exact.

The single-process reference is written from the gradient semantics of torchrec (see
recpeft.peft.distributed): adapter tables get the sum of the two processes' gradients (2 × the gradient
of the global-batch mean loss) and fbgemm's exact row-wise Adagrad,
    m_i += mean_k(g_ik²),   A_i -= lr·g_i / (√m_i + ε)      for the rows i of the batch;
B and the linear adapters get the mean (the global-batch gradient) and torch.optim.Adam.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from torchrec import EmbeddingCollection, EmbeddingConfig, KeyedJaggedTensor
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingPlan
from torchrec.optim import RowWiseAdagrad

from recpeft import LoraConfig, PeftModel, get_peft_model
from recpeft.peft import WEIGHTS_NAME

from reference_math import abs_twin, assert_bound_can_fail, assert_normwise_close, assert_within_bound
from torchrec_models import TABLES, make_batch, make_dlrm, slice_batch

# Roundings along torchrec's DLRM (reference_math.assert_within_bound): dense arch 4 + 16 (+ LoRA),
# bags of ≤ 3 ids (+ LoRA) ≤ 30; the pairwise dot interaction multiplies two of them (+ 8): ≤ 69;
# the over arch (inputs ≤ 18, 16, LoRA) ≤ 50; merged tables E + s·A·B add r + 2. 256 covers it.
DLRM_ROUNDINGS = 256


def _bound(model, x, kjt, **kwargs):
    """The float32 absolute-value twin's output (torchrec's collections run in float32)."""
    with torch.no_grad():
        return abs_twin(model, dtype=None)(x.abs(), kjt, **kwargs)


WORLD = 2
GLOBAL_BATCH, STEPS = 16, 4
EMB_LR, EMB_EPS, DENSE_LR = 0.05, 1e-8, 0.01
EBC_PATH = "sparse_arch.embedding_bag_collection"
PLAN_KINDS = ("table_wise", "row_wise")


def lora_config() -> LoraConfig:
    return LoraConfig(
        r=4, lora_alpha=8, target_modules=["t_user", "t_item", "t_cat", "over_arch.model.1"], rank_pattern={"t_cat": 8}
    )


def make_plan(kind: str) -> ShardingPlan:
    """The plan of the plain DLRM: every table table-wise (alternating processes) or row-wise."""
    ebc = make_dlrm("dlrm").sparse_arch.embedding_bag_collection
    per_table = {
        name: table_wise(rank=i % WORLD) if kind == "table_wise" else row_wise()
        for i, (name, _, _, _) in enumerate(TABLES)
    }
    return ShardingPlan(
        {
            EBC_PATH: construct_module_sharding_plan(
                ebc, per_table, local_size=WORLD, world_size=WORLD, device_type="cpu"
            )
        }
    )


def eval_batch():
    return make_batch(batch=GLOBAL_BATCH, seed=999)


def train_batch(step: int):
    return make_batch(batch=GLOBAL_BATCH, seed=100 + step)


# ---- the plan (no processes needed) ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_adapter_tables_mirror_the_plan_of_their_base_tables(kind):
    from recpeft.peft.distributed import peft_sharding_plan

    model = get_peft_model(make_dlrm("dlrm"), lora_config())
    plan = peft_sharding_plan(model, make_plan(kind)).plan
    prefix = f"base_model.{EBC_PATH}"
    assert sorted(plan) == [f"{prefix}.base_layer", f"{prefix}.lora_A.default.tables"]
    base, adapter = plan[f"{prefix}.base_layer"], plan[f"{prefix}.lora_A.default.tables"]
    assert sorted(base) == ["t_cat", "t_item", "t_shop", "t_user"] and sorted(adapter) == ["t_cat", "t_item", "t_user"]
    for table, sharding in adapter.items():
        assert base[table].compute_kernel == sharding.compute_kernel == "fused"
        assert sharding.sharding_type == base[table].sharding_type == kind and sharding.ranks == base[table].ranks
        rank = 8 if table == "t_cat" else 4
        mirrored = [(s.shard_offsets, s.shard_sizes, str(s.placement)) for s in sharding.sharding_spec.shards]
        assert mirrored == [
            (b.shard_offsets, [b.shard_sizes[0], rank], str(b.placement)) for b in base[table].sharding_spec.shards
        ]
    if kind == "row_wise":  # [0, 200) and [200, 400) of t_user on processes 0 and 1
        assert [s.shard_offsets[0] for s in adapter["t_user"].sharding_spec.shards] == [0, 200]


def test_plans_the_adapter_cannot_follow_are_refused():
    from torchrec.distributed.sharding_plan import column_wise

    from recpeft.peft.distributed import peft_sharding_plan

    model = get_peft_model(make_dlrm("dlrm"), lora_config())
    ebc = make_dlrm("dlrm").sparse_arch.embedding_bag_collection
    per_table = {name: row_wise() for name, _, _, _ in TABLES} | {"t_item": column_wise(ranks=[0, 1])}
    plan = ShardingPlan(
        {
            EBC_PATH: construct_module_sharding_plan(
                ebc, per_table, local_size=WORLD, world_size=WORLD, device_type="cpu"
            )
        }
    )
    with pytest.raises(ValueError, match="'t_item' is planned column_wise; its LoRA table needs whole rows"):
        peft_sharding_plan(model, plan)
    odd = get_peft_model(make_dlrm("dlrm"), LoraConfig(r=6, target_modules=["t_user"]))
    with pytest.raises(ValueError, match="'t_user': adapter rank 6 is not a multiple of 4"):
        peft_sharding_plan(odd, make_plan("row_wise"))
    with pytest.raises(ValueError, match="no entry for the adapted collection 'sparse_arch.embedding_bag_collection'"):
        peft_sharding_plan(model, ShardingPlan({}))


# ---- the single-process reference ------------------------------------------------------------------


def _adapter_tables(model: PeftModel) -> list[nn.Parameter]:
    return list(model.base_model.sparse_arch.embedding_bag_collection.lora_A.parameters())


def train_reference():
    """Unsharded: the same model and data; returns (model, per-step losses)."""
    model = get_peft_model(make_dlrm("dlrm"), lora_config())
    tables = _adapter_tables(model)
    dense = [p for p in model.parameters() if p.requires_grad and all(p is not t for t in tables)]
    optimizer = torch.optim.Adam(dense, lr=DENSE_LR)
    momentum = {id(t): torch.zeros(t.shape[0]) for t in tables}
    losses = []
    for step in range(STEPS):
        x, kjt, labels = train_batch(step)
        loss = F.binary_cross_entropy_with_logits(model(x, kjt).squeeze(1), labels)
        optimizer.zero_grad()
        for t in tables:
            t.grad = None
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            for t in tables:
                grad = t.grad.coalesce()
                rows, g = grad.indices()[0], grad.values() * WORLD
                m = momentum[id(t)]
                m[rows] += g.pow(2).mean(1)
                t[rows] -= EMB_LR * g / (m[rows].sqrt() + EMB_EPS).unsqueeze(1)
        losses.append(loss.item())
    return model, losses


# ---- the two processes ------------------------------------------------------------------------------


def _gather_rows(local: torch.Tensor) -> torch.Tensor:
    pieces = [torch.empty_like(local) for _ in range(WORLD)]
    dist.all_gather(pieces, local.contiguous())
    return torch.cat(pieces)


def _local(batch, rank):
    per = GLOBAL_BATCH // WORLD
    return slice_batch(batch, rank * per, (rank + 1) * per)


def worker(rank: int, port: int, out_dir: str, reference_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    from recpeft.peft.distributed import (
        dense_parameters,
        load_adapter_weights,
        optimizer_state_bytes,
        peft_module,
        save_adapters,
        shard_peft_model,
    )

    results = {}
    for kind in PLAN_KINDS:
        sharded = shard_peft_model(
            get_peft_model(make_dlrm("dlrm"), lora_config()),
            plan=make_plan(kind),
            embedding_optimizer=(RowWiseAdagrad, {"lr": EMB_LR, "eps": EMB_EPS}),
        )
        optimizer = torch.optim.Adam(dense_parameters(sharded), lr=DENSE_LR)
        losses = []
        for step in range(STEPS):
            x, kjt, labels = _local(train_batch(step), rank)
            loss = F.binary_cross_entropy_with_logits(sharded(x, kjt).squeeze(1), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total = loss.detach().clone()
            dist.all_reduce(total)
            losses.append(total.item() / WORLD)
        x, kjt, _ = _local(eval_batch(), rank)
        with torch.no_grad():
            outputs = _gather_rows(sharded(x, kjt))
        ids = torch.tensor([0, -1] * (x.shape[0] // 2))  # per-sample routing: adapter 0 or the base model
        with torch.no_grad():
            routed_outputs = _gather_rows(sharded(x, kjt, adapter_ids=ids))
        save_adapters(sharded, f"{out_dir}/{kind}")
        state = optimizer_state_bytes(sharded, optimizer)

        peft_module(sharded).merge_adapter()  # local: each process adds s·A·B into the rows it holds
        with torch.no_grad():
            merged_outputs = _gather_rows(sharded(x, kjt))

        fresh = shard_peft_model(get_peft_model(make_dlrm("dlrm"), lora_config()), plan=make_plan(kind))
        load_adapter_weights(fresh, reference_dir)
        with torch.no_grad():
            loaded_outputs = _gather_rows(fresh(x, kjt))
        results[kind] = dict(
            losses=losses,
            outputs=outputs,
            merged_outputs=merged_outputs,
            routed_outputs=routed_outputs,
            loaded_outputs=loaded_outputs,
            state=state,
        )
    results["planner"] = _planner_run(rank)
    results["ec"] = _embedding_collection_run(rank, out_dir)
    if rank == 0:
        torch.save(results, f"{out_dir}/results.pt")
    dist.barrier()
    dist.destroy_process_group()


def _planner_run(rank: int) -> dict:
    """No plan given: torchrec's planner plans the base tables (row shardings only), the
    adapter tables follow; A random, so the outputs check the adapter path too."""
    from recpeft.peft.distributed import shard_peft_model

    config = LoraConfig(r=4, target_modules=["t_user", "t_item", "t_cat"], init_lora_weights=False)
    sharded = shard_peft_model(get_peft_model(make_dlrm("dlrm"), config))
    x, kjt, _ = _local(eval_batch(), rank)
    with torch.no_grad():
        outputs = _gather_rows(sharded(x, kjt))
    plan = {
        path: {t: (p.sharding_type, p.compute_kernel, p.ranks) for t, p in module_plan.items()}
        for path, module_plan in sharded.plan.plan.items()
    }
    return dict(outputs=outputs, plan=plan)


class ItemSequence(nn.Module):
    """An EmbeddingCollection of two tables (row-wise and table-wise sharded)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.coll = EmbeddingCollection(
            [
                EmbeddingConfig(name="t_seq", embedding_dim=8, num_embeddings=100, feature_names=["seq"]),
                EmbeddingConfig(name="t_ctx", embedding_dim=8, num_embeddings=60, feature_names=["ctx"]),
            ]
        )

    def forward(self, kjt):
        out = self.coll(kjt)
        return torch.cat([out["seq"].values(), out["ctx"].values()])


def ec_input(rank: int):
    g = torch.Generator().manual_seed(rank)
    return KeyedJaggedTensor.from_lengths_sync(
        ["seq", "ctx"], torch.randint(0, 60, (12,), generator=g), torch.tensor([2, 1, 3, 0, 4, 2])
    )


def ec_model():
    return get_peft_model(ItemSequence(), LoraConfig(r=4, target_modules=["coll"], init_lora_weights=False))


def _embedding_collection_run(rank: int, out_dir: str) -> dict:
    from recpeft.peft.distributed import save_adapters, shard_peft_model

    model = ec_model()
    plan = ShardingPlan(
        {
            "coll": construct_module_sharding_plan(
                model.base_model.coll.base_layer,
                {"t_seq": row_wise(), "t_ctx": table_wise(rank=1)},
                local_size=WORLD,
                world_size=WORLD,
                device_type="cpu",
            )
        }
    )
    sharded = shard_peft_model(model, plan=plan, sharders=[EmbeddingCollectionSharder()])
    with torch.no_grad():
        outputs = [t.tolist() for t in _gather_list(sharded(ec_input(rank)))]
    save_adapters(sharded, f"{out_dir}/ec")
    return dict(outputs=outputs)


def _gather_list(local: torch.Tensor) -> list[torch.Tensor]:
    pieces: list = [None] * WORLD
    dist.all_gather_object(pieces, local)
    return pieces


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The reference (trained and saved here) and both sharded runs (one spawn of 2 processes)."""
    out = tmp_path_factory.mktemp("sharded")
    reference, losses = train_reference()
    reference.save_pretrained(out / "reference")
    mp.spawn(worker, args=(_free_port(), str(out), str(out / "reference")), nprocs=WORLD, join=True)
    return dict(reference=reference, losses=losses, dir=out, results=torch.load(out / "results.pt"))


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_sharded_training_matches_a_single_process_step_by_step(runs, kind):
    result = runs["results"][kind]
    # training trajectories through Adam's normalisation: no componentwise rounding bound, so the
    # normwise discrimination floor (a wrong step or a lost gradient changes them by O(1) relative)
    assert_normwise_close(torch.tensor(result["losses"]), torch.tensor(runs["losses"]), name="losses")
    x, kjt, _ = eval_batch()
    with torch.no_grad():
        expected = runs["reference"](x, kjt)
        assert (expected - make_dlrm("dlrm")(x, kjt)).abs().max() > 1e-2  # the adapters did train
    assert_normwise_close(result["outputs"], expected, name="outputs")


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_adapters_saved_sharded_equal_the_single_process_adapters(runs, kind):
    sharded = load_file(str(runs["dir"] / kind / WEIGHTS_NAME))
    single = load_file(str(runs["dir"] / "reference" / WEIGHTS_NAME))
    assert sorted(sharded) == sorted(single)
    for key, value in single.items():
        if key.endswith((".indices", ".shape")):
            assert torch.equal(sharded[key], value), key  # the same rows touched, in the same order
        else:  # float32 sums in another order, through Adam's normalisation: 1e-4 of the tensor's scale
            error = (sharded[key] - value).abs().max().item()
            assert error <= 1e-4 * value.abs().max().item(), (key, error)
    rows = single["base_model.model.sparse_arch.embedding_bag_collection.t_user.lora_embedding_A.indices"]
    assert 0 < rows.numel() < 400  # stored sparsely: only the rows the data touched


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_adapters_saved_sharded_load_unsharded_and_reproduce_the_outputs(runs, kind):
    loaded = PeftModel.from_pretrained(make_dlrm("dlrm"), runs["dir"] / kind)
    x, kjt, _ = eval_batch()
    with torch.no_grad():  # the same weights, sharded sums in another order
        bound = _bound(loaded, x, kjt)
        assert_within_bound(loaded(x, kjt), runs["results"][kind]["outputs"], bound, DLRM_ROUNDINGS, name="outputs")
        assert_bound_can_fail(runs["results"][kind]["outputs"], bound, DLRM_ROUNDINGS)


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_adapters_saved_unsharded_load_into_the_sharded_model(runs, kind):
    x, kjt, _ = eval_batch()
    with torch.no_grad():
        expected = runs["reference"](x, kjt)
    bound = _bound(runs["reference"], x, kjt)
    assert_within_bound(runs["results"][kind]["loaded_outputs"], expected, bound, DLRM_ROUNDINGS, name="loaded")


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_merging_into_sharded_tables_keeps_the_outputs(runs, kind):
    result = runs["results"][kind]
    x, kjt, _ = eval_batch()
    bound = _bound(PeftModel.from_pretrained(make_dlrm("dlrm"), runs["dir"] / kind), x, kjt)  # the saved weights
    assert_within_bound(result["merged_outputs"], result["outputs"], bound, DLRM_ROUNDINGS, name="merged")


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_routing_through_the_sharded_model(runs, kind):
    result = runs["results"][kind]
    x, kjt, _ = eval_batch()
    with torch.no_grad():
        base = make_dlrm("dlrm")(x, kjt)
    adapted = torch.tensor([0, 1] * (GLOBAL_BATCH // 2)) == 0  # each process routed [0, -1, 0, -1, ...]
    bound = _bound(
        PeftModel.from_pretrained(make_dlrm("dlrm"), runs["dir"] / kind), x, kjt
    )  # its terms cover the base's
    routed, outputs = result["routed_outputs"], result["outputs"]
    assert_within_bound(routed[adapted], outputs[adapted], bound[adapted], DLRM_ROUNDINGS, name="routed")
    assert_within_bound(routed[~adapted], base[~adapted], bound[~adapted], DLRM_ROUNDINGS, name="routed to the base")
    with pytest.raises(AssertionError, match="out of bound"):  # the base rows are not the adapted ones
        assert_within_bound(routed[~adapted], outputs[~adapted], bound[~adapted], DLRM_ROUNDINGS)


def test_without_a_plan_the_planner_shards_base_tables_and_adapters_follow(runs):
    result = runs["results"]["planner"]
    prefix = f"base_model.{EBC_PATH}"
    base, adapter = result["plan"][f"{prefix}.base_layer"], result["plan"][f"{prefix}.lora_A.default.tables"]
    for table, (sharding_type, kernel, ranks) in adapter.items():
        assert sharding_type in ("table_wise", "row_wise", "table_row_wise") and kernel == "fused"
        assert base[table][0] == sharding_type and base[table][2] == ranks
    x, kjt, _ = eval_batch()
    config = LoraConfig(r=4, target_modules=["t_user", "t_item", "t_cat"], init_lora_weights=False)
    with torch.no_grad():
        model = get_peft_model(make_dlrm("dlrm"), config)
        expected = model(x, kjt)
    assert_within_bound(result["outputs"], expected, _bound(model, x, kjt), DLRM_ROUNDINGS, name="outputs")


def test_a_sharded_embedding_collection_computes_and_saves_what_the_unsharded_one_does(runs):
    model = ec_model()
    with torch.no_grad():
        for rank, got in enumerate(runs["results"]["ec"]["outputs"]):
            twin = abs_twin(model, dtype=None)  # a bag-free lookup plus s·A·B (r ≤ 4): r + 3 roundings
            assert_within_bound(torch.tensor(got), model(ec_input(rank)), twin(ec_input(rank)), 4 + 3, name="ec")
    sharded = load_file(str(runs["dir"] / "ec" / WEIGHTS_NAME))
    single = model.adapter_state_dict()
    assert sorted(sharded) == sorted(single)
    for key in single:
        assert torch.equal(sharded[key], single[key]), key


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_base_tables_hold_no_optimizer_state(runs, kind):
    """Row-wise Adagrad keeps one float per row: Σ_t V_t · 4 bytes for the adapted tables
    (t_user 400, t_item 500, t_cat 300 rows); the base tables, all four, hold none."""
    state = runs["results"][kind]["state"]
    assert state["base_tables"] == 0
    assert state["adapter_tables"] == (400 + 500 + 300) * 4
    dense_trainable = (4 * 16 + 1 * 4) + (4 + 4 + 8) * 8  # the linear adapter's A, B and the three B_t
    # Adam: two moments and a step counter per parameter, replicated on every process
    assert state["dense"] == WORLD * (2 * dense_trainable * 4 + 5 * 4)
