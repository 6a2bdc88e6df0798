"""Compile every Triton kernel variant for the GPU ahead of time, on a machine without a GPU.

The interpreter proves the kernels' arithmetic; it cannot prove that a variant builds for the GPU
or fits an SM (DESIGN.md, "Triton without a GPU"). This module does: it drives the real
launchers of :mod:`recpeft.kernels.lora_linear`, :mod:`recpeft.kernels.lora_embedding_bag` and
:mod:`recpeft.kernels.segmented_lora` on small CPU tensors with every kernel's ``run`` replaced
by a recorder, so each launch yields exactly the arguments the GPU would get; triton's own
binder turns them into the signature, constexprs and divisibility attributes it would compile at
run time for :data:`TARGET`; and ``triton.compile`` then builds PTX and a cubin, with no driver
involved.

A *variant* is one kernel × one launch config (tiles, warps, stages) × dtype × constexpr flags.
The autotuned kernels of the linear op are compiled at every config of their tuning space — the
ones the autotuner may pick (``reachable``: kept by the op's shared-memory pruning) and the ones
the pruning removes (to show it was right to) — or, in the quick ``sample`` mode, at the first
reachable config only. For each variant the table records registers, spill bytes and the stack
frame (the ptxas log), shared memory (``metadata.shared``) and compile seconds.

:func:`gate_failures` is the gate the tests and ``make aot`` apply: any compile error, and any
reachable variant over :data:`~recpeft.kernels.launch.SHARED_MEMORY_LIMIT`, fails.

Run: ``python -m recpeft.kernels.aot --mode full --out benchmarks/results/aot_sm90.json``
(benchmarks/aot_compile.py and ``make aot`` wrap it; the full matrix takes about 40 minutes on
2 cores, the float32 GEMMs most of it; ``--max-minutes`` tables what was compiled by then, the
sample's variants first and the rest in a fixed random order; ``--reprune TABLE`` recomputes the
pruning columns of a table after a change of the estimate alone). Must run with
``TRITON_INTERPRET`` unset: interpreted kernels are not compilable functions.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import random
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

from . import lora_embedding_bag as bag_ops
from . import lora_linear as linear_ops
from . import reference
from . import segmented_lora as segmented_ops
from .bags import bag_layout
from .launch import INTERPRETING, SHARED_MEMORY_LIMIT
from .reference import LinearRoute

TARGET = GPUTarget("cuda", 90, 32)  # H100 / H200: sm_90, warps of 32
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MODES = ("sample", "full")
# Shapes of the recorded launches: multiples of 16, as training batches and layers are, so the
# binder gives sizes and strides the divisibility hints the GPU run gets.
ROWS, IN_FEATURES, OUT_FEATURES = 64, 128, 128
_PTXAS_USAGE = re.compile(r"Used (\d+) registers")
_PTXAS_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


# ---------------------------------------------------------------------------------------------
# Recording launches
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One compilable kernel variant: what ``triton.compile`` needs, and how the table names it."""

    module: str  # the op module that defines the kernel
    kernel: str  # the @triton.jit function's name
    dtype: str  # the input dtype of the launcher call
    config: dict  # tiles, num_warps, num_stages
    flags: dict  # the other constexprs (modes, padded rank, dot precision)
    signature: dict = field(repr=False)
    constexprs: dict = field(repr=False)
    attrs: dict = field(repr=False)
    options: dict = field(repr=False)
    reachable: bool = True  # a config the launcher or autotuner can pick
    shared_estimate: int | None = None  # the op's own estimate, for the configs it prunes by

    def key(self) -> tuple:
        """What the compiled binary depends on (the dtype label does not: a kernel whose
        pointers are all float32 is one variant whatever the launcher's dtype)."""
        options = (self.options["num_warps"], self.options["num_stages"])
        return (self.module, self.kernel, _frozen(self.signature), _frozen(self.constexprs), options)


def _frozen(d: dict) -> tuple:
    return tuple(sorted((k, str(v)) for k, v in d.items()))


@contextlib.contextmanager
def recorded_launches() -> Iterator[list]:
    """Within the block, every ``kernel[grid](...)`` records (kernel, args, kwargs) instead of
    running (there is no GPU to run on)."""
    launches: list = []

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    with mock.patch.object(JITFunction, "run", record):
        yield launches


def _bind(fn: JITFunction, args: tuple, kwargs: dict):
    """(signature, constexprs, attrs, options) exactly as ``JITFunction.run`` would derive them
    on a :data:`TARGET` device."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options.__dict__


def _variant(fn, args, kwargs, dtype, config_keys, reachable=True, shared_estimate=None) -> Variant:
    signature, constexprs, attrs, options = _bind(fn, args, kwargs)
    constexpr_names = {p.name for p in fn.params if p.is_constexpr}
    config = {k: kwargs[k] for k in config_keys if k in kwargs}
    config |= {"num_warps": options["num_warps"], "num_stages": options["num_stages"]}
    flags = {k: v for k, v in kwargs.items() if k in constexpr_names and k not in config}
    return Variant(
        fn.__module__,
        fn.__name__,
        str(dtype).removeprefix("torch."),
        config,
        flags,
        signature,
        constexprs,
        attrs,
        options,
        reachable,
        shared_estimate,
    )


# ---------------------------------------------------------------------------------------------
# Scenarios: launcher calls that reach every kernel × route × flags
# ---------------------------------------------------------------------------------------------


def _linear_inputs(dtype, rank, bias=True):
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    m, k, n = ROWS, IN_FEATURES, OUT_FEATURES
    return rnd(m, k), rnd(n, k), rnd(n) if bias else None, rnd(rank, k), rnd(n, rank), rnd(m, n)


def _linear_calls(dtype, rank, configs) -> None:
    """Forward and backward of every path (route, fold forward, fold backward, dropout, bias;
    the backward with and without dX, as for a layer whose input needs no gradient)."""
    paths = [  # (route, fold forward, fold backward, dropout p)
        (LinearRoute.MERGE, None, None, 0.0),
        (LinearRoute.EPILOGUE, True, True, 0.0),
        (LinearRoute.EPILOGUE, False, False, 0.0),
        (LinearRoute.EPILOGUE, False, True, 0.3),
        (LinearRoute.EPILOGUE, False, False, 0.3),
    ]
    fma = linear_ops._dot_precision(dtype) == "ieee"  # the dX GEMM is never folded there by default
    for bias in (True, False):
        x, w, b, a, bb, gy = _linear_inputs(dtype, rank, bias)
        for route, fold_fwd, fold_bwd, p in paths:
            fold_bwd = fold_bwd and not fma
            _, u = linear_ops.lora_linear_forward(x, w, b, a, bb, 0.5, p, 7, route, fold_fwd, configs=configs)
            for need_x in (True, False):
                linear_ops.lora_linear_backward(
                    gy, x, u, w, a, bb, 0.5, p, 7, route, fold_bwd, need_x, bias, configs=configs
                )
    linear_ops.dropout_keep_scale(7, ROWS, IN_FEATURES, 0.3, "cpu")


def _bag_calls(dtype, dim, rank, mean_len) -> None:
    """Forward (pooling E here or adding a given base output, with and without weights) and
    backward (both dB modes) of the embedding bag at one launch-settings point."""
    g = torch.Generator().manual_seed(0)
    num_bags, vocab = 32, 256
    table = torch.randn(vocab, dim, generator=g).to(dtype)
    lora_a = torch.randn(vocab, rank, generator=g).to(dtype)
    lora_b = torch.randn(rank, dim, generator=g).to(dtype)
    ids = torch.randint(vocab, (num_bags * mean_len,), generator=g)
    offsets = torch.arange(num_bags) * mean_len
    bag_of_id = torch.arange(num_bags).repeat_interleave(mean_len)
    weights = torch.rand(ids.numel(), generator=g).to(dtype)
    base = torch.randn(num_bags, dim, generator=g).to(dtype)
    for w in (None, weights):
        for given_base in (None, base):
            _, pooled = bag_ops.lora_embedding_bag_forward(table, lora_a, lora_b, ids, offsets, w, 0.5, given_base)
        for deterministic in (True, False):
            grad = torch.randn(num_bags, dim, generator=g).to(dtype)
            bag_ops.lora_embedding_bag_backward(grad, pooled, lora_b, bag_of_id, w, 0.5, deterministic=deterministic)


def _segmented_calls(dtype, rank, block_m) -> None:
    """Forward and backward of the segmented linear op (with and without dropout; the backward
    with and without dX) and of the segmented bag (with and without weights), 4 adapters of rank
    ``rank`` (rows of every adapter and of none), at the tiles the op's launch_settings picks for
    ``block_m`` rows per adapter (it lowers BLOCK_M for float32 at large ranks)."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    n = 4
    cfg = segmented_ops.launch_settings(block_m * n, n, rank, dtype)  # block_m rows per adapter
    x, w, b, _, _, gy = _linear_inputs(dtype, rank)
    lora_a, lora_b = rnd(n, rank, IN_FEATURES), rnd(n, OUT_FEATURES, rank)
    scales = torch.rand(n, generator=g)
    row_adapter = torch.arange(ROWS) % (n + 1) - 1
    plan = reference.segment_plan(row_adapter, n, cfg.block_m)
    for p in (None, torch.full((n,), 0.3)):
        _, u = segmented_ops.segmented_lora_linear_forward(x, w, b, lora_a, lora_b, scales, plan, cfg, p, 7)
        for need_x in (True, False):
            segmented_ops.segmented_lora_linear_backward(gy, x, u, w, lora_a, lora_b, scales, plan, cfg, p, 7, need_x)
    num_bags, vocab, dim, mean_len = 32, 256, 64, 4
    tables = rnd(n, vocab, rank)
    lora_b = rnd(n, rank, dim)
    bag_adapter = torch.arange(num_bags) % (n + 1) - 1
    plan = reference.segment_plan(bag_adapter, n, cfg.block_m)
    ids = torch.randint(vocab, (num_bags * mean_len,), generator=g)
    weights = torch.rand(ids.numel(), generator=g).to(dtype)
    refs = segmented_ops.table_refs([tables], stacked=True)
    offsets = torch.arange(num_bags) * mean_len
    for per_sample in (None, weights):
        layout = bag_layout(ids, offsets, num_embeddings=vocab, per_sample_weights=per_sample, weight_dtype=dtype)
        out = rnd(num_bags, dim)
        _, pooled = segmented_ops.segmented_lora_bag_forward(refs, lora_b, scales, layout, bag_adapter, plan, cfg, out)
    segmented_ops.segmented_lora_bag_backward(rnd(num_bags, dim), pooled, lora_b, scales, plan, cfg)


# Ranks whose padded rank (16, 32, 64, 128) covers every R_PAD / BLOCK_R the launchers make for
# r ≤ 128; the sample takes the common one.
RANKS = {"sample": (8,), "full": (8, 32, 64, 128)}
# Embedding bag launch settings: D from one D-tile of 16 to MAX_BLOCK_D; bag lengths 1 (plain
# lookups, BLOCK_L 1) to MAX_BLOCK_L; sample: one wide and one narrow table.
BAG_DIMS = {"sample": (16, 128), "full": (16, 32, 64, 128, 256)}
BAG_LENGTHS = {"sample": (4,), "full": (1, 4, bag_ops.MAX_BLOCK_L)}
# Rows per adapter of the segmented launches: the launcher's largest tile (most registers; the
# common one at many rows per adapter) in the sample, its smallest too in the full matrix.
SEGMENT_BLOCKS = {"sample": (segmented_ops.MAX_BLOCK_M,), "full": (16, segmented_ops.MAX_BLOCK_M)}


def _linear_variants(mode: str) -> list[Variant]:
    """Every recorded launch of the linear op's launchers, at every config of its kernel's
    tuning space (sample: the first reachable one)."""
    first = {name: space[0] for name, space in linear_ops.KERNEL_CONFIGS.items()}
    spaces = {linear_ops._KERNELS[name].__name__: name for name in linear_ops.KERNEL_CONFIGS}
    variants = []
    for dtype in DTYPES:
        for rank in RANKS[mode]:
            with recorded_launches() as launches:
                _linear_calls(dtype, rank, first)
            for fn, args, kwargs in launches:
                variants += _at_every_config(fn, args, kwargs, dtype, spaces.get(fn.__name__), mode)
    return variants


def _at_every_config(fn, args, kwargs, dtype, tuned_name, mode) -> list[Variant]:
    """The launch at each config of the kernel's tuning space (none: as launched)."""
    if tuned_name is None:
        return [_variant(fn, args, kwargs, dtype, ("BLOCK",))]
    space = linear_ops.tuning_space(tuned_name, kwargs)
    kept = linear_ops.reachable_configs(tuned_name, space, dtype, kwargs)
    chosen = kept[:1] if mode == "sample" else space
    out = []
    for config in chosen:
        over = dict(kwargs, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)
        estimate = linear_ops.shared_memory_estimate(tuned_name, config, dtype, kwargs)
        out.append(_variant(fn, args, over, dtype, tuple(config.kwargs), config in kept, estimate))
    return out


def _bag_variants(mode: str) -> list[Variant]:
    """Every recorded launch of the embedding bag's launchers over the launch-settings points."""
    config_keys = ("BLOCK_L", "BLOCK_D", "BLOCK_R", "BLOCK_B", "BLOCK_IDS")
    variants = []
    for dtype in DTYPES:
        for dim in BAG_DIMS[mode]:
            for rank in RANKS[mode]:
                for mean_len in BAG_LENGTHS[mode]:
                    with recorded_launches() as launches:
                        _bag_calls(dtype, dim, rank, mean_len)
                    variants += [_variant(fn, a, kw, dtype, config_keys) for fn, a, kw in launches]
    return variants


def _segmented_variants(mode: str) -> list[Variant]:
    """Every recorded launch of the segmented op's launchers over ranks and tile sizes."""
    config_keys = ("BLOCK_M", "BLOCK_C", "BLOCK_L", "BLOCK_R")
    variants = []
    for dtype in DTYPES:
        for rank in RANKS[mode]:
            for block_m in SEGMENT_BLOCKS[mode]:
                with recorded_launches() as launches:
                    _segmented_calls(dtype, rank, block_m)
                variants += [_variant(fn, a, kw, dtype, config_keys) for fn, a, kw in launches]
    return variants


def variants(mode: str) -> list[Variant]:
    """The variants of ``mode``, without duplicates. "sample": every kernel × dtype × route ×
    flags at its default config (the first reachable one) and rank 8; "full": every config and
    launch-settings point as well — the sample's variants first, then the rest in a fixed
    shuffled order, so that a run cut short by a deadline covers a uniform sample of the rest."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if INTERPRETING:
        raise RuntimeError("AOT compilation needs the compiled kernels: unset TRITON_INTERPRET")
    unique = {}
    for v in _linear_variants(mode) + _bag_variants(mode) + _segmented_variants(mode):
        unique.setdefault(v.key(), v)
    if mode == "sample":
        return list(unique.values())
    first = {v.key() for v in variants("sample")}
    rest = [v for key, v in unique.items() if key not in first]
    random.Random(0).shuffle(rest)
    return [unique[key] for key in unique if key in first] + rest


# ---------------------------------------------------------------------------------------------
# Compiling
# ---------------------------------------------------------------------------------------------


def _resource_usage(ptxas_log: str) -> dict:
    """Registers, stack frame and spill bytes from ptxas's ``-v`` log (None where absent)."""
    regs, stack = _PTXAS_USAGE.search(ptxas_log), _PTXAS_STACK.search(ptxas_log)
    return {
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "spill_store_bytes": int(stack.group(2)) if stack else None,
        "spill_load_bytes": int(stack.group(3)) if stack else None,
    }


def compile_variant(variant: Variant, fn: Callable | None = None) -> dict:
    """Compile one variant for :data:`TARGET`; its table row (``error`` set when it fails)."""
    fn = fn or getattr(importlib.import_module(variant.module), variant.kernel)
    row = {
        "kernel": variant.kernel,
        "dtype": variant.dtype,
        "config": variant.config,
        "flags": {k: v if isinstance(v, (bool, int, float)) else str(v) for k, v in variant.flags.items()},
        "reachable": variant.reachable,
        "shared_estimate_bytes": variant.shared_estimate,
    }
    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG prints the ptxas -v log
            src = ASTSource(fn, variant.signature, variant.constexprs, variant.attrs)
            compiled = triton.compile(src, target=TARGET, options=variant.options)
        row |= _resource_usage(log.getvalue()) | {"shared_bytes": compiled.metadata.shared, "error": None}
    except Exception as exc:  # noqa: BLE001 — every failure is a row of the table
        row |= {"shared_bytes": None, "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"}
    row["compile_s"] = round(time.perf_counter() - start, 2)
    return row


_WORKER_VARIANTS: list[Variant] = []


def _worker_init(mode: str, cache_dir: str) -> None:
    # A private cache: ptxas runs (and logs) for every variant, not only for uncached ones.
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated
    _WORKER_VARIANTS[:] = variants(mode)


def _worker_compile(index: int) -> dict:
    return compile_variant(_WORKER_VARIANTS[index])


def compile_all(
    mode: str, jobs: int | None = None, progress: Callable[[dict], None] | None = None, deadline_s: float | None = None
) -> tuple[list[dict], int]:
    """(table rows, number of variants planned) for ``mode``, compiled in ``jobs`` processes.
    With ``deadline_s``, variants not started by then are skipped (the rows say which ran)."""
    count = len(variants(mode))
    jobs = jobs or os.cpu_count() or 1
    stop_at = time.monotonic() + deadline_s if deadline_s else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="recpeft-aot-") as cache_dir:
        context = get_context("spawn")
        init = (mode, cache_dir)
        with ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init, initargs=init) as pool:
            pending = [pool.submit(_worker_compile, i) for i in range(count)]
            for future in pending:
                if stop_at is not None and time.monotonic() > stop_at:
                    for later in pending:
                        later.cancel()  # refused by those already running or done
                if future.cancelled():
                    continue
                rows.append(future.result())
                if progress:
                    progress(rows[-1])
    return rows, count


# ---------------------------------------------------------------------------------------------
# The gate and the table
# ---------------------------------------------------------------------------------------------


def gate_failures(rows: list[dict], limit: int = SHARED_MEMORY_LIMIT) -> list[str]:
    """One line per failure: a compile error, a reachable variant over ``limit`` bytes of shared
    memory (a pruned variant over the limit is the pruning working), or a variant that needs
    more than the op's estimate (the pruning could then keep a config that does not fit)."""
    failures = []
    for row in rows:
        name = f"{row['kernel']} {row['dtype']} {row['config']} {row['flags']}"
        if row["error"]:
            failures.append(f"{name}: compile error: {row['error'].splitlines()[0]}")
        elif row["reachable"] and row["shared_bytes"] > limit:
            failures.append(f"{name}: {row['shared_bytes']} bytes of shared memory > {limit}")
        elif (row.get("shared_estimate_bytes") or row["shared_bytes"]) < row["shared_bytes"]:
            failures.append(f"{name}: the pruning's estimate {row['shared_estimate_bytes']} < {row['shared_bytes']}")
    return failures


def summary(rows: list[dict]) -> dict:
    """The table's headline figures."""
    ok = [r for r in rows if not r["error"]]
    reachable = [r for r in ok if r["reachable"]]
    spilling = [r for r in ok if (r["spill_store_bytes"] or 0) + (r["spill_load_bytes"] or 0) > 0]
    over = [r for r in ok if r["shared_bytes"] > SHARED_MEMORY_LIMIT]
    return {
        "variants": len(rows),
        "reachable_variants": len(reachable),
        "compile_errors": len(rows) - len(ok),
        "max_registers": max((r["registers"] or 0 for r in ok), default=None),
        "variants_with_spills": len(spilling),
        "reachable_variants_with_spills": sum(r["reachable"] for r in spilling),
        "max_shared_bytes_reachable": max((r["shared_bytes"] for r in reachable), default=None),
        "max_shared_bytes_any": max((r["shared_bytes"] for r in ok), default=None),
        "pruned_variants_over_limit": sum(not r["reachable"] for r in over),
        "reachable_variants_over_limit": sum(r["reachable"] for r in over),
        "compile_seconds_total": round(sum(r["compile_s"] for r in rows), 1),
    }


def _config_dict(config: triton.Config) -> dict:
    return config.kwargs | {"num_warps": config.num_warps, "num_stages": config.num_stages}


def reprune(rows: list[dict]) -> list[dict]:
    """The rows with ``reachable`` and ``shared_estimate_bytes`` recomputed by the op's current
    pruning (the compiled figures do not depend on it), for a change of the estimate alone."""
    tuned = {linear_ops._KERNELS[name].__name__: name for name in linear_ops.KERNEL_CONFIGS}
    out = []
    for row in rows:
        name = tuned.get(row["kernel"])
        if name is not None:
            space = linear_ops.KERNEL_CONFIGS[name]
            config = next(c for c in space if _config_dict(c) == row["config"])
            dtype = getattr(torch, row["dtype"])
            kept = linear_ops.reachable_configs(name, space, dtype, row["flags"])
            estimate = linear_ops.shared_memory_estimate(name, config, dtype, row["flags"])
            row = row | {"reachable": config in kept, "shared_estimate_bytes": estimate}
        out.append(row)
    return out


def write_table(rows: list[dict], path: str, mode: str, wall_s: float, planned: int) -> dict:
    """Write the JSON table (header, summary, rows) to ``path``; returns it. ``planned``: the
    variants of the mode; fewer rows mean a deadline cut the run short."""
    table = {
        "target": {"backend": TARGET.backend, "arch": TARGET.arch, "warp_size": TARGET.warp_size},
        "shared_memory_limit": SHARED_MEMORY_LIMIT,
        "mode": mode,
        "complete": len(rows) == planned,
        "variants_planned": planned,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "host_cpus": os.cpu_count(),
        "wall_s": round(wall_s, 1),
        "summary": summary(rows),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=MODES, default="sample")
    parser.add_argument("--out", help="write the JSON table here")
    parser.add_argument("--jobs", type=int, default=None, help="compile processes (default: CPU count)")
    parser.add_argument("--max-minutes", type=float, default=None, help="start no variant after this; table the rest")
    parser.add_argument("--reprune", metavar="TABLE", help="recompute a table's pruning columns; no compiling")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, stated
    if args.reprune:
        with open(args.reprune) as f:
            table = json.load(f)
        rows, planned = reprune(table["rows"]), table.get("variants_planned", len(table["rows"]))
        write_table(rows, args.out or args.reprune, table["mode"], table["wall_s"], planned)
        return _report(rows, table["wall_s"], planned)
    start = time.perf_counter()

    def progress(row):
        status = "ERROR" if row["error"] else f"{row['registers']} regs {row['shared_bytes']} B"
        print(f"{row['compile_s']:6.1f}s {row['kernel']} {row['dtype']} {row['config']} {status}", flush=True)

    deadline = args.max_minutes * 60 if args.max_minutes else None
    rows, planned = compile_all(args.mode, args.jobs, progress, deadline)
    wall = time.perf_counter() - start
    if args.out:
        write_table(rows, args.out, args.mode, wall, planned)
    return _report(rows, wall, planned)


def _report(rows: list[dict], wall: float, planned: int) -> int:
    """Print the summary and the gate's failures; the exit status."""
    print(json.dumps(summary(rows) | {"wall_s": round(wall, 1), "variants_planned": planned}, indent=1))
    failures = gate_failures(rows)
    for line in failures:
        print("FAIL", line, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
