"""Sharded LoRA training with torchrec's ``DistributedModelParallel`` (DMP).

A ``PeftModel`` whose torchrec collections are adapted goes through DMP whole::

    model = get_peft_model(dlrm, LoraConfig(r=8, target_modules=[EmbeddingBagCollection, nn.Linear]))
    sharded = shard_peft_model(model, plan=plan)                # every process, same model
    optimizer = torch.optim.Adam(dense_parameters(sharded), lr=1e-3)
    loss = loss_fn(sharded(dense, kjt), labels)
    optimizer.zero_grad(); loss.backward(); optimizer.step()    # adapter tables stepped inside backward
    save_adapters(sharded, "adapters/DE")                       # every process; process 0 writes

What is sharded how:

- **Base tables** (``<collection>.base_layer``) are sharded by ``plan`` — the plan you would give
  DMP for the plain model, keyed by the collection's module path in it (``"sparse_arch.
  embedding_bag_collection"``) — or by torchrec's planner. They are frozen twice over: the LoRA
  layer looks them up without autograd, so no gradient ever reaches them, and their fused kernel
  is given fbgemm's stateless exact SGD with learning rate 0, so they hold no optimizer state
  (measured by :func:`optimizer_state_bytes`) and could not move even if a gradient came.
  The two other ways torchrec offers fail on the CPU: fbgemm's optimizer type NONE ("supports only
  EmbeddingLocation.DEVICE") and the non-fused ``dense`` kernel (no autograd kernel on the CPU,
  and a sharded EmbeddingCollection with it corrupts memory in torchrec 1.8 / fbgemm-gpu-cpu 1.8).
- **Adapter tables** A_t (``<collection>.lora_A.<adapter>.<group>``) are sharded with the *same*
  plan as their base table: same sharding type, same processes, same row blocks (a row-wise
  shard [o, o + n) × D of E_t becomes [o, o + n) × r_t of A_t), so row i of A_t lives beside row i
  of E_t and merging is local. They use the ``fused`` kernel with torchrec's fused optimizer,
  applied in backward (``embedding_optimizer``; fbgemm's CPU kernels offer exact row-wise Adagrad,
  Adagrad and SGD — not Adam). Table-wise, row-wise and table-row-wise plans are supported;
  column-wise shards split D, which A_t [V, r] does not have; r_t must be a multiple of 4
  (fbgemm's fused kernels).
- **B matrices, linear adapters, modules_to_save copies** are ordinary parameters: data-parallel
  (DMP wraps them in DistributedDataParallel), trained by any torch optimizer over
  :func:`dense_parameters`.

Gradients follow torchrec: a sharded table receives the *sum* over processes of the gradients of
each process's loss, a data-parallel parameter their *mean*. With per-process mean losses over
equal local batches this is, for the adapter tables, the world size times the gradient of the
global-batch mean loss (row-wise Adagrad is nearly invariant to that scale: only ε sees it).

Saving and loading: :func:`save_adapters` gathers each adapter table's touched rows from its
shards and writes exactly the files ``PeftModel.save_pretrained`` writes unsharded;
:func:`load_adapter_weights` writes a saved adapter (from either) into the shards each process holds.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import EnumerableShardingSpec
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import (
    EmbeddingModuleShardingPlan,
    ParameterSharding,
    ShardingEnv,
    ShardingPlan,
    ShardingType,
)
from torchrec.optim import RowWiseAdagrad

from recpeft.layers.torchrec import LoraCollectionLayer
from recpeft.utils.tensor_bytes import tensor_bytes

from .model import PeftModel
from .serialization import read_adapter_file, weights_file

#: sharding types under which every process holds whole rows of a table
ROW_SHARDINGS = (ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
BASE_PREFIX = "base_model."
#: fbgemm's fused table kernels need every shard's width to be a multiple of 4
FUSED_DIM_MULTIPLE = 4


def _collections(model: PeftModel) -> dict[str, LoraCollectionLayer]:
    """Module path in the user's model (``PeftModel.base_model``) → adapter holder of the torchrec
    family (:class:`~recpeft.layers.torchrec.LoraCollectionLayer`, the base of every collection
    wrapper): the holders whose tables DMP shards, and all that this module plans."""
    return {name: holder for name, holder in model.adapter_holders().items() if isinstance(holder, LoraCollectionLayer)}


# ---- the plan ----------------------------------------------------------------------------------


def adapter_parameter_sharding(base: ParameterSharding, rank: int, table: str) -> ParameterSharding:
    """The sharding of A_t [V, r] that mirrors ``base``, the sharding of E_t [V, D]: the same
    sharding type and processes, every row block [o, o + n) × D becoming [o, o + n) × r, with the
    ``fused`` kernel (the adapter table trains with torchrec's fused optimizer)."""
    if rank % FUSED_DIM_MULTIPLE:
        raise ValueError(
            f"table {table!r}: adapter rank {rank} is not a multiple of {FUSED_DIM_MULTIPLE}, which fbgemm's "
            f"fused kernel needs for a sharded table; choose r (or rank_pattern) accordingly"
        )
    if base.sharding_type not in ROW_SHARDINGS:
        raise ValueError(
            f"table {table!r} is planned {base.sharding_type}; its LoRA table needs whole rows per process: "
            f"plan it {', '.join(ROW_SHARDINGS)}"
        )
    shards = []
    for shard in base.sharding_spec.shards:
        if shard.shard_offsets[1] != 0:
            raise ValueError(
                f"table {table!r}: a shard starts at column {shard.shard_offsets[1]}; LoRA needs whole rows"
            )
        shards.append(
            ShardMetadata(
                shard_offsets=[shard.shard_offsets[0], 0],
                shard_sizes=[shard.shard_sizes[0], rank],
                placement=shard.placement,
            )
        )
    return dataclasses.replace(
        base, compute_kernel=EmbeddingComputeKernel.FUSED.value, sharding_spec=EnumerableShardingSpec(shards)
    )


def peft_sharding_plan(model: PeftModel, plan: ShardingPlan) -> ShardingPlan:
    """The DMP plan for ``model`` from ``plan``, the plan of the plain model: each adapted
    collection's base tables as planned (with the ``fused`` kernel, see :func:`freeze_base_tables`),
    its adapter tables mirroring them (:func:`adapter_parameter_sharding`); collections that are
    not adapted as planned."""
    collections = _collections(model)
    derived: dict[str, EmbeddingModuleShardingPlan] = {}
    for path, module_plan in plan.plan.items():
        layer = collections.get(path)
        if layer is None:
            derived[BASE_PREFIX + path] = module_plan
            continue
        missing = sorted(set(layer.part_names(layer.base_layer)) - module_plan.keys())
        if missing:
            raise ValueError(f"the plan for {path!r} has no entry for table {missing[0]!r}")
        derived[f"{BASE_PREFIX}{path}.base_layer"] = EmbeddingModuleShardingPlan(
            {
                table: dataclasses.replace(sharding, compute_kernel=EmbeddingComputeKernel.FUSED.value)
                for table, sharding in module_plan.items()
            }
        )
        for adapter in layer.lora_A:
            for group, collection in layer.lora_A[adapter].items():
                derived[f"{BASE_PREFIX}{path}.lora_A.{adapter}.{group}"] = EmbeddingModuleShardingPlan(
                    {
                        config.name: adapter_parameter_sharding(
                            module_plan[config.name], config.embedding_dim, config.name
                        )
                        for config in layer.table_configs(collection)
                    }
                )
    unplanned = sorted(set(collections) - plan.plan.keys())
    if unplanned:
        raise ValueError(
            f"the plan has no entry for the adapted collection {unplanned[0]!r}; planned: {sorted(plan.plan)}"
        )
    return ShardingPlan(derived)


def plan_base_tables(model: PeftModel, env: ShardingEnv, device_type: str = "cpu") -> ShardingPlan:
    """torchrec's planner on the base collections, adapted tables restricted to row shardings;
    returned keyed as for the plain model (the input of :func:`peft_sharding_plan`)."""
    constraints = {
        table: ParameterConstraints(sharding_types=list(ROW_SHARDINGS))
        for layer in _collections(model).values()
        for table in layer.part_names(layer.base_layer)
    }
    topology = Topology(world_size=env.world_size, compute_device=device_type, local_world_size=env.world_size)
    planner = EmbeddingShardingPlanner(topology=topology, constraints=constraints)
    full = planner.collective_plan(model.base_model, get_default_sharders(), env.process_group)
    plan = {}
    for path, module_plan in full.plan.items():
        if path.endswith(".base_layer"):
            plan[path.removesuffix(".base_layer")] = module_plan
        elif ".lora_A." not in path:
            plan[path] = module_plan
    return ShardingPlan(plan)


# ---- sharding ---------------------------------------------------------------------------------


def shard_peft_model(
    model: PeftModel,
    plan: ShardingPlan | None = None,
    env: ShardingEnv | None = None,
    device: torch.device | None = None,
    embedding_optimizer: tuple[type, dict] = (RowWiseAdagrad, {"lr": 0.01}),
    **dmp_kwargs,
) -> DistributedModelParallel:
    """Shard ``model`` with DMP (call on every process, with the same model).

    Args:
        model: a PeftModel, materialised (not on the meta device), identical on every process
            (same seed or the same checkpoint): its full state is copied into the shards.
        plan: the plan of the plain model (module path → table → ParameterSharding), or None
            for torchrec's planner.
        env: the sharding environment (default: the default process group).
        device: the compute device (default CPU).
        embedding_optimizer: (optimizer class, kwargs) of the adapter tables' fused optimizer,
            e.g. ``(torchrec.optim.RowWiseAdagrad, {"lr": 0.05})``; torch.optim.SGD and
            torch.optim.Adagrad also run on CPU.
        dmp_kwargs: passed to DistributedModelParallel (e.g. ``data_parallel_wrapper``).
    """
    env = env or ShardingEnv.from_process_group(dist.group.WORLD)
    device = device or torch.device("cpu")
    plan = plan if plan is not None else plan_base_tables(model, env, device.type)
    dmp_plan = peft_sharding_plan(model, plan)
    optimizer_class, optimizer_kwargs = embedding_optimizer
    for layer in _collections(model).values():
        freeze_base_tables(layer.base_layer)
        for adapter in layer.lora_A:
            _apply_optimizer_in_backward(optimizer_class, layer.lora_A[adapter].parameters(), dict(optimizer_kwargs))
    full_state = model.state_dict()
    sharded = DistributedModelParallel(model, env=env, device=device, plan=dmp_plan, **dmp_kwargs)
    copy_full_state(sharded, full_state)
    return sharded


def freeze_base_tables(collection: nn.Module) -> None:
    """Give the base tables' fused kernel fbgemm's exact SGD with learning rate 0: no optimizer
    state, no possible update. (Set as the per-table optimizer torchrec reads from the unsharded
    parameters, ``_optimizer_classes`` / ``_optimizer_kwargs``, which ``_apply_optimizer_in_backward``
    would set but cannot on parameters that do not require grad.)"""
    for param in collection.parameters():
        param._optimizer_classes = [torch.optim.SGD]
        param._optimizer_kwargs = [{"lr": 0.0}]


@torch.no_grad()
def copy_full_state(
    sharded: DistributedModelParallel, full_state: dict[str, torch.Tensor], release: bool = True
) -> None:
    """Write the unsharded ``full_state`` into ``sharded``: each process copies the blocks of
    every sharded tensor it holds, and every other tensor whole.

    With ``release``, the memory of each unsharded table is freed once copied (its storage is
    resized to zero; shape and strides stay): DMP keeps a reference to the parameters it sharded
    (``EmbeddingShardingInfo.param``, read for its size and strides), which would otherwise hold a
    second, unsharded copy of every table on every process."""
    for key, target in sharded.state_dict().items():
        source = full_state[key]
        if isinstance(target, ShardedTensor):
            for shard in target.local_shards():
                (row, col), (rows, cols) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(source[row : row + rows, col : col + cols])
            if release:
                source.untyped_storage().resize_(0)
        elif target.data_ptr() != source.data_ptr():
            target.copy_(source)


def peft_module(sharded: DistributedModelParallel) -> PeftModel:
    """The PeftModel inside DMP (and DDP)."""
    return sharded.module


def dense_parameters(sharded: DistributedModelParallel) -> list[nn.Parameter]:
    """The trainable parameters that are not sharded tables: B matrices, linear adapters,
    modules_to_save copies, trained biases — for an ordinary torch optimizer."""
    sharded_names = set(DistributedModelParallel._sharded_parameter_names(sharded.module))
    return [p for name, p in sharded.named_parameters() if p.requires_grad and name not in sharded_names]


# ---- accounting -------------------------------------------------------------------------------


def optimizer_state_bytes(
    sharded: DistributedModelParallel, dense_optimizer: torch.optim.Optimizer | None = None
) -> dict[str, int]:
    """Bytes of optimizer state over all processes (collective): the fused optimizer's state of
    the base tables and of the adapter tables, and ``dense_optimizer``'s state."""
    totals = {"base_tables": 0, "adapter_tables": 0, "dense": 0}
    for key, state in sharded.fused_optimizer.state_dict()["state"].items():
        kind = "adapter_tables" if ".lora_A." in key else "base_tables"
        totals[kind] += sum(tensor_bytes(v) for v in state.values())
    if dense_optimizer is not None:
        totals["dense"] = sum(tensor_bytes(v) for state in dense_optimizer.state.values() for v in state.values())
    counts = torch.tensor([totals[k] for k in totals], dtype=torch.int64)
    dist.all_reduce(counts, group=sharded._env.process_group)
    return dict(zip(totals, counts.tolist()))


# ---- files ------------------------------------------------------------------------------------


def save_adapters(
    sharded: DistributedModelParallel, save_directory: str | Path, selected_adapters: list[str] | None = None
) -> None:
    """``PeftModel.save_pretrained`` for a sharded model: every process calls it (the adapter
    tables' rows are gathered from their shards), process 0 of the group writes the same files an
    unsharded model writes."""
    group = sharded._env.process_group
    peft_module(sharded).save_pretrained(save_directory, selected_adapters, is_main_process=dist.get_rank(group) == 0)
    dist.barrier(group)


def load_adapter_weights(
    sharded: DistributedModelParallel, model_id: str | Path, adapter_name: str = "default"
) -> None:
    """Write the adapter saved in ``model_id`` (by a sharded or an unsharded model) into
    ``adapter_name`` of ``sharded``, which must have that adapter with the same targets (create it
    with get_peft_model from the saved config before sharding). Every file key and shape is checked
    before anything is written; each process writes the table blocks it holds."""
    tensors = read_adapter_file(model_id)
    peft_module(sharded).load_adapter_state(adapter_name, tensors, str(weights_file(model_id)))
