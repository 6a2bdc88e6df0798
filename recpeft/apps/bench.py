"""``recpeft bench``: the cost of LoRA fine-tuning against dense fine-tuning with Adam, measured
side by side in one run, on the CPU or a CUDA GPU (``device``).

Model. By default the demo's click model (``recpeft.apps.shop_recipe.BASE_OPTIONS``: torchrec DLRM, dense
arch 2 → 32 → D, over arch → 64 → 32 → 1, D = 64) over the shop schema's features, but with
production-size tables (``DEFAULT_ROWS``):

    t_user 2,000,000 × D   t_item 500,000 × D   t_category 25 × D   t_brand 151 × D
    t_price_bucket 11 × D                     (the shop's vocabularies + 1 out-of-vocabulary row)

i.e. 2,500,187 · 64 · 4 B = 640 MB of fp32 tables. ``rows_per_table`` overrides some of these
sizes; ``base=DIR`` measures a saved base checkpoint (:func:`recpeft.apps.base_checkpoint.load_base`) with
its own sizes instead.

Batches. ``NUM_BATCHES`` pre-drawn batches of B rows (seeded): one id per feature and row;
tables with ≥ ``POWER_LAW_MIN_ROWS`` rows draw ids from a power law, P(k-th most popular row)
∝ k^−``POWER_LAW_EXPONENT``, the ranks scattered over the table by a fixed random permutation;
smaller tables draw uniformly. Dense features ~ N(0, 1) [B, num_dense]; labels ~ Bernoulli(0.3) [B].
Step t uses batch t mod ``NUM_BATCHES``.

Variants. One step = forward, mean BCE of the logits [B] against the labels, backward, optimizer
step, gradients cleared (set to None). Both variants take the optimizers
:class:`recpeft.train.Trainer` builds, from :func:`recpeft.train.build_optimizers` (lr ``LR``, no
weight decay, no clipping):

    dense   every parameter trainable; torch AdamW (foreach) on all of them — the tables get dense
            V × D gradients and two V × D moment tensors each (dense fine-tuning with Adam)
    lora    ``get_peft_model(base, lora_config)`` (default: ``shop_recipe.LORA``, r = 4 on the
            category, brand and price tables and every MLP layer); base frozen; LoraAdamW (lazy
            Adam on the touched rows) on the adapter tables' A, torch AdamW on the rest

Both start from the same base model; before anything is timed their logits on a batch must agree
(LoRA starts equal to its base).

samples/s. ``WARMUP_STEPS`` steps of each variant, then ``rounds`` interleaved rounds (dense,
lora, dense, lora, …) of ``steps`` steps each; a round's step time is its wall time / steps;
samples/s = B / (median step time over the rounds). Ratio = lora / dense.

Peak memory (:mod:`recpeft.utils.memory_probe`). Each variant runs in a fresh process (``python -m
recpeft.apps.bench --memory VARIANT --spec JSON``, with ``MALLOC_MMAP_THRESHOLD_=131072`` so freed
large blocks leave the resident set). With the batches drawn, the process reads its resident set
(VmRSS), resets the high-water mark VmHWM through ``/proc/self/clear_refs``, builds the model (and
wraps it), resets the mark again and trains ``MEMORY_STEPS`` steps:

    peak_bytes      = VmHWM over the training steps − VmRSS before building  (model, gradients,
                      optimizer state, activations: what the fine-tuning job holds)
    model_bytes     = VmRSS once built − VmRSS before building
    training_bytes  = peak_bytes − model_bytes
    build_peak_bytes= VmHWM while building − VmRSS before building

Ratio = lora peak / dense peak. Targets (``TARGETS``): samples/s ratio ≥ 2, peak ratio ≤ 0.5.

Example::

    result = run_bench(rows_per_table={"user": 100_000}, steps=2, rounds=3)
    print_bench(result)   # result is JSON-able; the caller writes it
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from recpeft.datasets import FeatureEncoder
from recpeft.datasets.batch import Batch
from recpeft.datasets.synthetic import SHOP_SCHEMA
from recpeft.models.dlrm import ClickDLRM, build_click_model, click_model_lora_targets, single_id_kjt
from recpeft.peft.config import LoraConfig
from recpeft.train.trainer import bce_loss, build_optimizers
from recpeft.utils.devices import AUTO, describe_device, resolve_device
from recpeft.utils.memory_probe import (
    can_measure_memory,
    describe_peak_memory,
    measure_peak_memory,
    run_json_subprocesses,
)
from recpeft.utils.tensor_bytes import tensor_bytes
from recpeft.utils.validation import check_int, parse_json_object

from .base_checkpoint import CONFIG, ENCODER, WEIGHTS, load_base, read_base_config
from .shop_recipe import BASE_OPTIONS, LORA
from .workflow import Method, make_trainable

#: production-size tables for the shop schema's features (shop vocabularies + 1 oov row for the small ones)
DEFAULT_ROWS = {"user": 2_000_000, "item": 500_000, "category": 25, "brand": 151, "price_bucket": 11}
POWER_LAW_EXPONENT = 1.05  # Zipf-like popularity: the top 100 of 500k items get about 40% of the lookups
POWER_LAW_MIN_ROWS = 1000  # smaller (attribute) tables draw ids uniformly
NUM_BATCHES = 4
CLICK_RATE = 0.3
LR = 1e-3
WARMUP_STEPS = 2
MEMORY_STEPS = 3
SEED = 0
VARIANTS = ("dense", "lora")
LABELS = {
    "dense": "dense fine-tuning, AdamW on every parameter",
    "lora": "LoRA (recpeft), LoraAdamW + AdamW on the adapters",
}
TARGETS = {"samples_per_second_ratio_min": 2.0, "peak_memory_ratio_max": 0.5}
START_TOLERANCE = 1e-6  # |lora − dense| logits at init; LoRA starts exactly at its base


# ---- what both processes rebuild -------------------------------------------------------------


@dataclass(frozen=True)
class BenchSpec:
    """Everything a memory-probe process needs to rebuild the model and the batches.

    Args:
        model: :func:`build_click_model` keyword arguments (the architecture; ``cardinalities``
            gives each table's rows).
        lora_config: ``LoraConfig.to_dict()`` of the LoRA variant.
        batch_size: B.
        base: a base checkpoint folder, or None to build ``model`` with random weights.
        seed: seeds the weights (when built) and the batches.
        threads: torch intra-op threads.
        device: where the variants train (a torch device string).
    """

    model: dict
    lora_config: dict
    batch_size: int
    base: str | None = None
    seed: int = SEED
    threads: int = 1
    device: str = "cpu"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BenchSpec:
        data = parse_json_object(text, "--spec")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(f"--spec is not a BenchSpec JSON object: {exc}") from None


def model_options(rows_per_table: dict | None, embedding_dim: int) -> dict:
    """:func:`build_click_model` arguments of the default benchmark model: ``DEFAULT_ROWS``
    updated by ``rows_per_table`` (feature → rows, features of the shop schema only)."""
    check_int("embedding_dim", embedding_dim)
    rows = dict(DEFAULT_ROWS)
    for feature, count in (rows_per_table or {}).items():
        if feature not in DEFAULT_ROWS:
            raise ValueError(
                f"rows_per_table: unknown feature {feature!r}; the benchmark's tables are {list(DEFAULT_ROWS)}"
            )
        rows[feature] = check_int(f"rows_per_table[{feature!r}]", count)
    options = dict(
        BASE_OPTIONS,
        embedding_dim=embedding_dim,
        over_arch=list(BASE_OPTIONS["over_arch"]),
        dense_arch=[*BASE_OPTIONS["dense_arch"][:-1], embedding_dim],
    )
    return {"cardinalities": rows, "num_dense": len(SHOP_SCHEMA.dense), **options}


def _checkpoint_lora_config(base: str | Path) -> LoraConfig:
    """The demo's rank and alpha on ``recpeft finetune``'s default targets for that checkpoint
    (read from its config and encoder; the weights are loaded once, by ``build_base``)."""
    for name in (WEIGHTS, CONFIG, ENCODER):
        if not (Path(base) / name).is_file():
            raise FileNotFoundError(
                f"{base} is not a base checkpoint: {name} is missing (make one with `recpeft pretrain`)"
            )
    spec = read_base_config(base)["model"]
    schema = FeatureEncoder.load(Path(base) / ENCODER).schema
    targets = click_model_lora_targets(
        schema.sparse_features,
        len(spec["dense_arch"]),
        len(spec["over_arch"]),
        frozen_features=(schema.user, schema.item),
    )
    return replace(LORA, target_modules=targets)


def build_base(spec: BenchSpec) -> ClickDLRM:
    """The base model of ``spec``: the checkpoint at ``spec.base``, else a seeded random one."""
    if spec.base is not None:
        return load_base(spec.base)[0]
    torch.manual_seed(spec.seed)
    return build_click_model(**spec.model)


def power_law_ids(
    rows: int, count: int, generator: torch.Generator, exponent: float = POWER_LAW_EXPONENT
) -> torch.Tensor:
    """``count`` ids in [0, rows), int64, where the k-th most popular id (k = 1 … rows) has
    probability ∝ k^−exponent (continuous inverse CDF of x^−s on [1, rows + 1), floored), the
    popularity ranks scattered over the ids by a random permutation."""
    u = torch.rand(count, generator=generator, dtype=torch.float64)
    top = (rows + 1.0) ** (1.0 - exponent)
    rank = (1.0 + u * (top - 1.0)) ** (1.0 / (1.0 - exponent))
    rank = rank.floor().long().clamp_(1, rows) - 1
    return torch.randperm(rows, generator=generator)[rank]


def draw_batches(model_spec: dict, batch_size: int, seed: int, count: int = NUM_BATCHES) -> list[Batch]:
    """``count`` batches for a click model of ``model_spec`` (see the module docstring): args
    (dense float32 [B, num_dense], KeyedJaggedTensor with one id per feature and row), labels
    float32 [B]."""
    generator = torch.Generator().manual_seed(seed + 1)
    batches = []
    for _ in range(count):
        ids = {
            f: power_law_ids(rows, batch_size, generator)
            if rows >= POWER_LAW_MIN_ROWS
            else torch.randint(0, rows, (batch_size,), generator=generator)
            for f, rows in model_spec["cardinalities"].items()
        }
        dense = torch.randn(batch_size, model_spec["num_dense"], generator=generator)
        labels = (torch.rand(batch_size, generator=generator) < CLICK_RATE).float()
        batches.append(Batch((dense, single_id_kjt(ids)), labels))
    return batches


# ---- the two variants ----------------------------------------------------------------------


def prepare_variant(name: str, base: nn.Module, lora_config: LoraConfig, lr: float = LR):
    """(model in train mode, optimizers) of variant ``name`` ("dense" or "lora"); ``base`` is
    consumed (:func:`~recpeft.apps.workflow.make_trainable` wraps it or makes it trainable in
    place). The optimizers are the ones :class:`Trainer` would build."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; variants: {list(VARIANTS)}")
    try:
        model = make_trainable(base, Method(name), lora_config).train()
    except ValueError as exc:
        raise ValueError(
            f"the LoRA config does not fit the benchmarked model ({exc}); pass a lora_config "
            f"whose target_modules exist in it"
        ) from None
    return model, build_optimizers(model, lr, weight_decay=0.0)


def train_step(model: nn.Module, optimizers, batch: Batch) -> float:
    """Forward, BCE, backward, every optimizer's step, gradients set to None; the loss."""
    loss = bce_loss(model, batch)
    loss.backward()
    for optimizer in optimizers:
        optimizer.step()
    for optimizer in optimizers:
        optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


# ---- peak memory, a fresh process per variant ---------------------------------------------------


def memory_probe(variant: str, spec: BenchSpec, steps: int = MEMORY_STEPS) -> dict:
    """In this (fresh) process: peak memory of building ``variant`` from ``spec`` and training it
    (on the CPU the resident set, :func:`measure_peak_memory`; on CUDA the device's allocations,
    :func:`cuda_peak_memory`)."""
    torch.set_num_threads(spec.threads)
    device = torch.device(spec.device)
    batches = [batch.to(device) for batch in draw_batches(spec.model, spec.batch_size, spec.seed)]
    config = LoraConfig.from_dict(spec.lora_config)
    measure = cuda_peak_memory if device.type == "cuda" else measure_peak_memory
    result = measure(
        lambda: prepare_variant(variant, build_base(spec).to(device), config),
        lambda built, i: train_step(*built, batches[i % len(batches)]),
        steps,
    )
    return {"variant": variant, **result}


def cuda_peak_memory(build, step, steps: int) -> dict:
    """:func:`~recpeft.utils.memory_probe.measure_peak_memory`'s figures from CUDA's allocator
    (``memory_allocated`` / ``max_memory_allocated`` of the current device, bytes):
    model_bytes = allocated once built − before; build_peak_bytes = the peak while building −
    before; peak_bytes = the peak over ``steps`` training steps − before; training_bytes =
    peak_bytes − model_bytes."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    built = build()
    torch.cuda.synchronize()
    model, build_peak = torch.cuda.memory_allocated() - before, torch.cuda.max_memory_allocated() - before
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for i in range(steps):
        step(built, i)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / max(steps, 1)
    peak = torch.cuda.max_memory_allocated() - before
    return {
        "peak_bytes": peak,
        "model_bytes": model,
        "training_bytes": peak - model,
        "build_peak_bytes": build_peak,
        "step_s_in_probe": round(seconds, 4),
    }


def run_memory_probes(variants, spec: BenchSpec, timeout: float = 600) -> dict:
    """{variant: :func:`memory_probe`} each in its own fresh ``python -m recpeft.apps.bench`` process."""
    argvs = [[sys.executable, "-m", "recpeft.apps.bench", "--memory", v, "--spec", spec.to_json()] for v in variants]
    return dict(zip(variants, run_json_subprocesses(argvs, timeout=timeout)))


# ---- the run -------------------------------------------------------------------------------


def _max_logit_difference(models: dict, batch: Batch) -> float:
    with torch.no_grad():
        logits = [model.eval()(*batch.args) for model in models.values()]
    for model in models.values():
        model.train()
    return float((logits[0] - logits[1]).abs().max())


def run_bench(
    *,
    base: str | Path | None = None,
    rows_per_table: dict | None = None,
    embedding_dim: int = 64,
    batch_size: int = 2048,
    steps: int = 3,
    rounds: int = 5,
    lora_config: LoraConfig | None = None,
    progress: bool = True,
    device: str | torch.device | None = AUTO,
) -> dict:
    """Measure dense fine-tuning with Adam against LoRA (see the module docstring); a JSON-able dict.

    Args:
        base: a base checkpoint folder to measure, or None for the default model.
        rows_per_table: feature → rows overriding ``DEFAULT_ROWS`` (not with ``base``).
        embedding_dim: D of the default model (not with ``base``).
        batch_size: B rows per step.
        steps: steps per timed round; rounds: interleaved rounds per variant.
        lora_config: the LoRA variant's config; default ``shop_recipe.LORA``.
        progress: show a tqdm bar.
        device: where both variants train: "auto" (CUDA when present, else the CPU), "cpu",
            "cuda", "cuda:N"; on CUDA each timed round ends with a synchronize, and peak memory
            is the device's (:func:`cuda_peak_memory`).

    Returns: {"model": shapes and sizes, "batch", "lora_config", "variants": {name: samples/s,
    step times, peak bytes …}, "ratios", "targets", "met", "start_logits_max_abs_diff",
    "memory_method", "device", "torch", "threads", "created", "seconds"}.
    """
    started = time.perf_counter()
    for name, value in (("batch_size", batch_size), ("steps", steps), ("rounds", rounds)):
        check_int(name, value)
    if base is not None and (rows_per_table is not None or embedding_dim != 64):
        raise ValueError(
            "rows_per_table and embedding_dim set the default model's sizes; a base checkpoint (base=...) has its own"
        )
    if lora_config is not None and not isinstance(lora_config, LoraConfig):
        raise TypeError(f"lora_config must be a LoraConfig, got {type(lora_config).__name__}")
    device = resolve_device(device)
    cuda = device.type == "cuda"
    config = lora_config or (LORA if base is None else _checkpoint_lora_config(base))
    spec_model = model_options(rows_per_table, embedding_dim) if base is None else None
    spec = BenchSpec(
        model=spec_model or {},
        lora_config=config.to_dict(),
        batch_size=batch_size,
        base=None if base is None else str(base),
        threads=torch.get_num_threads(),
        device=str(device),
    )
    base_model = build_base(spec)
    spec = replace(spec, model=dict(base_model.spec))  # every build_click_model argument, JSON-ready
    batches = [batch.to(device) for batch in draw_batches(spec.model, batch_size, spec.seed)]
    table_bytes = sum(tensor_bytes(p) for p in base_model.sparse_arch.embedding_bag_collection.parameters())
    parameters = sum(p.numel() for p in base_model.parameters())

    bar = tqdm(total=len(VARIANTS) * (2 + rounds), desc="bench", unit="task", disable=not progress, leave=False)
    with bar:
        base_model = base_model.to(device)
        built = {"lora": prepare_variant("lora", copy.deepcopy(base_model), config)}
        built["dense"] = prepare_variant("dense", base_model, config)
        del base_model
        models = {name: built[name][0] for name in VARIANTS}
        start_diff = _max_logit_difference(models, batches[0])
        if not start_diff <= START_TOLERANCE:
            raise RuntimeError(
                f"LoRA and dense fine-tuning do not start from the same model: logits differ by {start_diff:.3g}"
            )
        trainable = {
            name: sum(p.numel() for p in model.parameters() if p.requires_grad) for name, model in models.items()
        }
        counters = dict.fromkeys(VARIANTS, 0)

        def run_steps(name: str, count: int) -> float:
            model, optimizers = built[name]
            if cuda:
                torch.cuda.synchronize(device)
            begin = time.perf_counter()
            for _ in range(count):
                train_step(model, optimizers, batches[counters[name] % len(batches)])
                counters[name] += 1
            if cuda:
                torch.cuda.synchronize(device)
            return (time.perf_counter() - begin) / count

        for name in VARIANTS:
            bar.set_postfix_str(f"warm-up {name}")
            run_steps(name, WARMUP_STEPS)
            bar.update()
        step_seconds = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name in VARIANTS:
                bar.set_postfix_str(f"timing {name}")
                step_seconds[name].append(run_steps(name, steps))
                bar.update()
        built.clear()  # frees the models before the probes (run_steps keeps the dict, not them)
        del models
        gc.collect()

        bar.set_postfix_str("peak memory (a fresh process per variant)")
        probes = run_memory_probes(VARIANTS, spec) if cuda or can_measure_memory() else dict.fromkeys(VARIANTS)
        bar.update(len(VARIANTS))

    variants = {}
    for name in VARIANTS:
        median = statistics.median(step_seconds[name])
        probe = probes[name] or {}
        variants[name] = {
            "label": LABELS[name],
            "trainable_parameters": trainable[name],
            "step_seconds": [round(s, 6) for s in step_seconds[name]],
            "median_step_seconds": round(median, 6),
            "samples_per_second": batch_size / median,
            **{k: probe.get(k) for k in ("peak_bytes", "model_bytes", "training_bytes", "build_peak_bytes")},
        }
    dense, lora = variants["dense"], variants["lora"]
    speed = lora["samples_per_second"] / dense["samples_per_second"]
    measured = bool(dense["peak_bytes"]) and lora["peak_bytes"] is not None
    memory = lora["peak_bytes"] / dense["peak_bytes"] if measured else None
    return {
        "model": {
            "source": "checkpoint" if base is not None else "built",
            "base": spec.base,
            **spec.model,
            "table_bytes": table_bytes,
            "parameters": parameters,
        },
        "batch": {
            "batch_size": batch_size,
            "batches": len(batches),
            "ids": (f"power law k^-{POWER_LAW_EXPONENT} for tables of ≥ {POWER_LAW_MIN_ROWS} rows, uniform below"),
            "click_rate": CLICK_RATE,
        },
        "lora_config": spec.lora_config,
        "timing": {
            "warmup_steps": WARMUP_STEPS,
            "steps_per_round": steps,
            "rounds": rounds,
            "lr": LR,
            "order": "interleaved " + ", ".join(VARIANTS) + " per round; median step time per variant",
        },
        "variants": variants,
        "ratios": {"samples_per_second": speed, "peak_memory": memory},
        "targets": dict(TARGETS),
        "met": {
            "samples_per_second": speed >= TARGETS["samples_per_second_ratio_min"],
            "peak_memory": None if memory is None else memory <= TARGETS["peak_memory_ratio_max"],
        },
        "start_logits_max_abs_diff": start_diff,
        "memory_method": _memory_method(cuda, all(probes.values())),
        "device": describe_device(device),
        "torch": torch.__version__,
        "threads": spec.threads,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 2),
    }


def _memory_method(cuda: bool, measured: bool) -> str:
    if cuda:
        return (
            f"fresh process per probe; CUDA allocator: peak = max_memory_allocated over {MEMORY_STEPS} "
            "training steps - memory_allocated before building the model"
        )
    return describe_peak_memory(MEMORY_STEPS) if measured else "not measured: needs Linux /proc/self/clear_refs"


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:,.0f}"


def _ratio(value) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.3f}"


def print_bench(result: dict) -> None:
    """A small table of :func:`run_bench`'s result: samples/s and peak memory per variant, the
    ratios and whether the targets are met."""
    model = result["model"]
    tables = ", ".join(f"{f} {rows:,}" for f, rows in model["cardinalities"].items())
    print(
        f"model: {model['source']} DLRM, D={model['embedding_dim']}, tables {tables} "
        f"({model['table_bytes'] / 2**20:,.0f} MiB); batch {result['batch']['batch_size']}; "
        f"{result['threads']} thread(s); {result['device']}"
    )
    header = f"{'variant':<52} {'trainable':>12} {'samples/s':>10} {'peak MiB':>9} {'model MiB':>10}"
    print(header)
    print("-" * len(header))
    for row in result["variants"].values():
        print(
            f"{row['label']:<52} {row['trainable_parameters']:>12,} {row['samples_per_second']:>10,.0f} "
            f"{_mib(row['peak_bytes']):>9} {_mib(row['model_bytes']):>10}"
        )
    ratios, targets, met = result["ratios"], result["targets"], result["met"]
    verdict = {True: "met", False: "MISSED", None: "not measured"}
    print(
        f"LoRA / dense samples/s: {_ratio(ratios['samples_per_second'])} "
        f"(target ≥ {targets['samples_per_second_ratio_min']}: {verdict[met['samples_per_second']]})"
    )
    print(
        f"LoRA / dense peak memory: {_ratio(ratios['peak_memory'])} "
        f"(target ≤ {targets['peak_memory_ratio_max']}: {verdict[met['peak_memory']]})"
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m recpeft.apps.bench --memory VARIANT --spec JSON``: print :func:`memory_probe`'s JSON."""
    parser = argparse.ArgumentParser(prog="python -m recpeft.apps.bench", description=main.__doc__)
    parser.add_argument("--memory", required=True, choices=VARIANTS)
    parser.add_argument("--spec", required=True, help="BenchSpec JSON")
    args = parser.parse_args(argv)
    print(json.dumps(memory_probe(args.memory, BenchSpec.from_json(args.spec))))


if __name__ == "__main__":
    main()
