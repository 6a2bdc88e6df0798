"""Every Triton kernel compiles for sm_90 (H100/H200) and fits its shared memory — checked on
this machine, GPU or not, by kernels/aot.py (``triton.compile`` for ``GPUTarget("cuda", 90, 32)``).

The default run compiles the covering sample (every kernel × dtype × route × flags at the
config the launcher or autotuner takes first: about a minute on 2 cores); ``-m slow`` (and
``make aot``, which also writes benchmarks/results/aot_sm90.json) compiles the full matrix. The
compiler runs in a subprocess without TRITON_INTERPRET, which the test process has set on CPU
machines (interpreted kernels cannot be compiled).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from recpeft.kernels import aot, lora_embedding_bag, lora_linear, segmented_lora
from recpeft.kernels.launch import SHARED_MEMORY_LIMIT

DTYPES = {"float32", "bfloat16", "float16"}


def _compiler_env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _run_aot(mode, out, timeout):
    proc = subprocess.run(
        [sys.executable, "-m", "recpeft.kernels.aot", "--mode", mode, "--out", str(out)],
        env=_compiler_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, f"AOT {mode} failed:\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def _launched_kernels() -> set[str]:
    """The @triton.jit kernels the op files launch (helpers are inlined into them)."""
    names = set()
    for module in (lora_linear, lora_embedding_bag, segmented_lora):
        for name, value in vars(module).items():
            if name.endswith("_kernel") and (hasattr(value, "arg_names") or hasattr(value, "fn")):
                names.add(name)
    return names


def _check_table(table):
    """The gate (no compile error; no pickable variant over the limit; the op's shared-memory
    estimate, by which it prunes, never below the compiled figure), every kernel in every
    dtype, and a ptxas figure for every variant."""
    rows = table["rows"]
    assert not aot.gate_failures(rows)
    for row in rows:
        assert row["registers"] is not None, f"no ptxas log for {row['kernel']}"
        if row["reachable"]:
            assert row["shared_bytes"] <= SHARED_MEMORY_LIMIT, row
    kernels = {r["kernel"] for r in rows}
    assert kernels == _launched_kernels()
    for kernel in kernels - {"_keep_scale_kernel"}:  # the mask kernel has no dtype
        assert {r["dtype"] for r in rows if r["kernel"] == kernel} == DTYPES, kernel


def test_sample_compiles_for_sm90_within_the_shared_memory_limit(tmp_path):
    table = _run_aot("sample", tmp_path / "aot.json", timeout=600)
    _check_table(table)
    spilling = [r for r in table["rows"] if (r["spill_store_bytes"] or 0) + (r["spill_load_bytes"] or 0)]
    assert not spilling, f"{len(spilling)} default variants spill registers, e.g. {spilling[0]}"
    flags = {(r["kernel"], json.dumps(r["flags"], sort_keys=True)) for r in table["rows"]}
    routes = {f for k, f in flags if k == "_skinny_products_kernel"}
    assert len(routes) >= 5, "the skinny-products kernel's roles (shrink, merge, separate, dropout) are not all covered"
    assert {json.loads(f)["FOLD_V"] for k, f in flags if k == "_grad_x_kernel"} == {True, False}
    expand_modes = {
        tuple(json.loads(f)[m] for m in ("ADD_DST", "OUTER", "DROPOUT"))
        for k, f in flags
        if k == "_segment_expand_kernel"
    }
    assert expand_modes == {
        (True, False, False),
        (True, True, False),
        (True, True, True),
        (False, True, False),
        (False, True, True),
    }


@pytest.mark.slow
def test_full_matrix_compiles_for_sm90_within_the_shared_memory_limit(tmp_path):
    table = _run_aot("full", tmp_path / "aot.json", timeout=7200)
    _check_table(table)
    tuned = [r for r in table["rows"] if r["kernel"] in ("_forward_kernel", "_grad_x_kernel")]
    assert any(not r["reachable"] for r in tuned), "nothing pruned: the full matrix did not reach the large ranks"


BROKEN = '''
import sys
import torch
import triton
import triton.language as tl
from recpeft.kernels import aot


@triton.jit
def drifting_accumulator_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """acc starts float32 and turns float64 inside the loop: the compiler refuses a loop-carried
    value that changes type (what float64 inputs did to the linear op's kernels)."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, n, BLOCK):
        acc += tl.load(x_ptr + k + offs)
    tl.store(out_ptr + offs, acc)


@triton.jit
def hoarding_kernel(a_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """A pipelined reduction over 256×256 fp32 tiles, 4 stages: far over sm_90's shared memory."""
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k in range(0, n, BLOCK):
        a = tl.load(a_ptr + offs[:, None] * n + (k + offs)[None, :])
        b = tl.load(a_ptr + (k + offs)[:, None] * n + offs[None, :])
        acc = tl.dot(a, b, acc)
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], acc)


rows = []
x = torch.zeros(256 * 256)
for fn, args, kwargs in [
    (drifting_accumulator_kernel, (x.double(), x, 1024), {"BLOCK": 128}),
    (hoarding_kernel, (x, x, 256), {"BLOCK": 256, "num_stages": 4, "num_warps": 8}),
]:
    variant = aot._variant(fn, args, kwargs, torch.float32, ("BLOCK",))
    rows.append(aot.compile_variant(variant, fn))
for line in aot.gate_failures(rows):
    print(line)
'''


def test_the_gate_fails_a_broken_kernel_and_one_over_the_limit(tmp_path):
    script = tmp_path / "broken_kernels.py"
    script.write_text(textwrap.dedent(BROKEN))
    proc = subprocess.run(
        [sys.executable, str(script)], env=_compiler_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    failures = proc.stdout.strip().splitlines()
    assert len(failures) == 2, proc.stdout
    assert failures[0].startswith("drifting_accumulator_kernel") and "compile error" in failures[0]
    assert failures[1].startswith("hoarding_kernel") and f"> {SHARED_MEMORY_LIMIT}" in failures[1]


@pytest.mark.parametrize("name", list(lora_linear.KERNEL_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("r_pad", [16, 32, 64, 128])
@pytest.mark.parametrize("folded", [False, True])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_the_autotuner_sees_only_configs_that_fit(name, dtype, r_pad, folded, precision):
    """Every launch keeps at least one config, only of its family (FMA tiles for a full-precision
    fp32 dot, tensor-core tiles otherwise), and only configs whose estimate fits sm_90's shared
    memory (the estimate is checked against the compiled figure by the gate above)."""
    meta = {"R_PAD": r_pad, "FOLD_V": folded, "FOLD_SHRINK": folded, "DOT_PRECISION": precision}
    space = lora_linear.KERNEL_CONFIGS[name]
    kept = lora_linear.reachable_configs(name, space, dtype, meta)
    family = (lora_linear.FMA_CONFIGS if precision == "ieee" else lora_linear.TENSOR_CORE_CONFIGS)[name]
    assert kept
    for config in kept:
        assert any(config is c for c in family), config
        assert lora_linear.shared_memory_estimate(name, config, dtype, meta) <= SHARED_MEMORY_LIMIT, config


def test_the_configs_the_issue_found_over_the_limit_are_pruned():
    """dX GEMM 128×128×64, 3 stages, folded v at R_PAD=64 (fp32), and at R_PAD=128 (bf16)."""
    big = lora_linear.GRAD_X_CONFIGS[0]
    assert (big.kwargs["BLOCK_M"], big.kwargs["BLOCK_N"], big.kwargs["BLOCK_K"], big.num_stages) == (128, 128, 64, 3)
    for dtype, r_pad in ((torch.float32, 64), (torch.bfloat16, 128)):
        kept = lora_linear.reachable_configs(
            "grad_x", lora_linear.GRAD_X_CONFIGS, dtype, {"R_PAD": r_pad, "FOLD_V": True}
        )
        assert big not in kept
