"""LoRA embedding bag, fp32 CPU: recpeft's LoraEmbeddingBag against its floor and rivals, and the
backward's memory at two table sizes.

Shape: table V=1,000,000 × D=64, rank r=8, α=16 (s = 2); 4096 bags of 20 uniform random ids
(1-D ids + offsets, mode="sum"). Loss = (out·g).sum() for a random g. Every call takes the next of
``NUM_BATCHES`` pre-drawn batches (fresh ids, as in training), and gradients are cleared
(``.grad = None``) before it, both outside the timed region.

    frozen   (a) frozen nn.EmbeddingBag, forward only — the floor
    recpeft  (b) get_peft_model on a model holding the bag (init_lora_weights=False: A and B
                 random), forward + backward
    unfused  (c) F.embedding_bag on E + (F.embedding_bag on A, sparse=True)·B·s, forward + backward
    dense    (d) dense fine-tuning of the table: nn.EmbeddingBag(sparse=True) trainable,
                 forward + backward

Before anything is timed: recpeft and unfused give the same output and the same gradients of A
(sparse, compared row by row on the touched rows) and B; dense gives the frozen output and the
gradient Σ g over each id's bags.

Memory: the backward of (b) at V=250,000 and V=2,000,000, each in a fresh subprocess
(``python benchmarks/bench_lora_embedding_bag.py --memory-probe V``), measured with
:mod:`recpeft.utils.memory_probe`. The probe builds the model, runs one warm-up step, runs the
forward, then resets the resident-set high-water mark (/proc/self/clear_refs) and records how far
the backward raises it above the resident set before it. glibc is told to serve every allocation
over 128 KiB by mmap (MALLOC_MMAP_THRESHOLD_), so freed blocks leave the resident set and the
high-water mark is the backward's true peak.
A dense V×r gradient of A would add V·r·4 bytes: 8 MB at 250k, 64 MB at 2M.

Target (reported, not asserted): recpeft/frozen ≤ 1.6x. Asserted: the backward's extra memory
does not grow with V.
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from recpeft import LoraConfig, get_peft_model
from recpeft.utils.memory_probe import MALLOC_MMAP_THRESHOLD, can_measure_memory, resident_growth, run_json_subprocesses
from recpeft.utils.tensor_bytes import tensor_bytes

V, D, R, ALPHA = 1_000_000, 64, 8, 16
NUM_BAGS, BAG_LEN = 4096, 20
ROUNDS = 30
NUM_BATCHES = 8
INTERLEAVED_ROUNDS = 20
MEMORY_SIZES = (250_000, 2_000_000)

SUITE = {
    "name": "lora_embedding_bag",
    "title": f"LoRA embedding bag, fp32, V={V:,} D={D} r={R}, {NUM_BAGS} bags x {BAG_LEN} ids, sum",
    "shape": {
        "V": V,
        "D": D,
        "r": R,
        "lora_alpha": ALPHA,
        "num_bags": NUM_BAGS,
        "bag_len": BAG_LEN,
        "mode": "sum",
        "ids": "uniform random, 1-D ids + offsets",
    },
    "dtype": "float32",
    "floor": "frozen",
    "targets": {"recpeft": 1.6},
    "anchors": {},
}
VARIANTS = ["frozen", "recpeft", "unfused", "dense"]


class BagModel(nn.Module):
    def __init__(self, num_embeddings: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(num_embeddings, D, mode="sum")

    def forward(self, ids, offsets):
        return self.bag(ids, offsets)


def make_peft(num_embeddings: int):
    model = BagModel(num_embeddings)
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["bag"], init_lora_weights=False))


def make_batch(num_embeddings: int, generator: torch.Generator):
    ids = torch.randint(0, num_embeddings, (NUM_BAGS * BAG_LEN,), generator=generator)
    offsets = torch.arange(0, NUM_BAGS * BAG_LEN, BAG_LEN)
    g = torch.randn(NUM_BAGS, D, generator=generator)
    return ids, offsets, g


def assert_sparse_rows_close(
    bench, name: str, got: torch.Tensor, expected_rows: torch.Tensor, expected_values: torch.Tensor
) -> None:
    """A sparse gradient holds exactly ``expected_rows`` (sorted) with ``expected_values``."""
    assert got.is_sparse, f"{name}: expected a sparse gradient, got {got.layout}"
    got = got.coalesce()
    rows = got.indices()[0]
    assert torch.equal(rows, expected_rows), f"{name}: gradient rows differ"
    bench.assert_close(name, got.values(), expected_values)


@pytest.fixture(scope="module")
def case(bench):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    scale = ALPHA / R
    peft = make_peft(V)
    layer = peft.base_model.bag
    frozen = layer.base_layer  # the frozen nn.EmbeddingBag, shared with (b) and (c)
    table = frozen.weight
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]  # [V, r], [r, D]
    assert peft.peft_config["default"].scale_for("bag") == scale
    assert not table.requires_grad
    batches = [make_batch(V, generator) for _ in range(NUM_BATCHES)]
    current = {"batch": batches[0]}

    unfused_A = lora_A.detach().clone().requires_grad_(True)
    unfused_B = lora_B.detach().clone().requires_grad_(True)

    def unfused(ids, offsets):
        base = F.embedding_bag(ids, table, offsets, mode="sum")
        pooled = F.embedding_bag(ids, unfused_A, offsets, mode="sum", sparse=True)  # [nb, r]
        return base + (pooled @ unfused_B) * scale

    dense = nn.EmbeddingBag(V, D, mode="sum", sparse=True, _weight=table.detach().clone())

    def forward_only(forward):
        def run():
            ids, offsets, _ = current["batch"]
            return forward(ids, offsets)

        return run

    def fwd_bwd(forward):
        def run():
            ids, offsets, g = current["batch"]
            (forward(ids, offsets) * g).sum().backward()

        return run

    def next_batch_and_clear(*tensors):
        order = iter(range(10**9))

        def reset():
            current["batch"] = batches[next(order) % NUM_BATCHES]
            for t in tensors:
                t.grad = None

        return reset

    variants = {
        "frozen": bench.Variant("(a) frozen EmbeddingBag fwd (floor)", forward_only(frozen), next_batch_and_clear()),
        "recpeft": bench.Variant(
            "(b) recpeft LoraEmbeddingBag fwd+bwd", fwd_bwd(peft), next_batch_and_clear(lora_A, lora_B)
        ),
        "unfused": bench.Variant(
            "(c) unfused E-bag + A-bag(sparse)@B fwd+bwd", fwd_bwd(unfused), next_batch_and_clear(unfused_A, unfused_B)
        ),
        "dense": bench.Variant(
            "(d) dense sparse-grad table fwd+bwd", fwd_bwd(dense), next_batch_and_clear(dense.weight)
        ),
    }

    # ---- the variants compute the same thing, checked before anything is timed ----
    ids, offsets, g = batches[0]
    with torch.no_grad():
        out_frozen = frozen(ids, offsets)
    for t in (lora_A, lora_B, unfused_A, unfused_B, dense.weight):
        t.grad = None
    out_peft = peft(ids, offsets)
    (out_peft * g).sum().backward()
    out_unf = unfused(ids, offsets)
    (out_unf * g).sum().backward()
    out_dense = dense(ids, offsets)
    (out_dense * g).sum().backward()

    bench.assert_close("recpeft out vs unfused out", out_peft, out_unf)
    bench.assert_close("recpeft dB vs unfused dB", lora_B.grad, unfused_B.grad)
    expected_A = unfused_A.grad.coalesce()
    assert_sparse_rows_close(
        bench, "recpeft dA vs unfused dA", lora_A.grad, expected_A.indices()[0], expected_A.values()
    )
    bench.assert_close("dense out vs frozen out", out_dense, out_frozen)
    rows, inverse = torch.unique(ids, sorted=True, return_inverse=True)
    bag_of_id = torch.arange(NUM_BAGS).repeat_interleave(BAG_LEN)
    expected_dE = torch.zeros(rows.numel(), D).index_add_(0, inverse, g[bag_of_id])
    assert_sparse_rows_close(bench, "dense dE vs sum of g", dense.weight.grad, rows, expected_dE)
    delta = (out_peft - out_frozen).abs().max().item()
    assert delta > 0.1 * out_frozen.abs().max().item(), f"the adapter barely changes the output ({delta:.2e})"
    for variant in variants.values():
        variant.reset()
    return variants


def test_variants_agree(case):
    """The check itself runs in the ``case`` fixture, before any timing."""
    assert set(case) == set(VARIANTS)


@pytest.mark.parametrize("name", VARIANTS)
def test_lora_embedding_bag(benchmark, report, case, name):
    report.time(benchmark, name, case[name], rounds=ROUNDS)


def test_lora_embedding_bag_interleaved(request, bench, report, case):
    bench.skip_if_not_timing(request.config)
    report.time_interleaved(case, rounds=INTERLEAVED_ROUNDS)


# ---- backward memory, independent of V -----------------------------------------------------


def memory_probe(num_embeddings: int) -> dict:
    """Run in a fresh process: the resident memory the backward of (b) adds, in bytes."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    peft = make_peft(num_embeddings)
    lora_A = peft.base_model.bag.lora_A["default"]
    lora_B = peft.base_model.bag.lora_B["default"]
    ids, offsets, g = make_batch(num_embeddings, generator)
    (peft(ids, offsets) * g).sum().backward()  # warm-up: one-time allocations of the libraries
    lora_A.grad = lora_B.grad = None
    loss = (peft(ids, offsets) * g).sum()
    _, peak_extra, retained = resident_growth(loss.backward)
    grad = lora_A.grad
    return {
        "V": num_embeddings,
        "backward_peak_extra_bytes": peak_extra,
        "backward_retained_bytes": retained,
        "grad_A_sparse": grad.is_sparse,
        "grad_A_bytes": tensor_bytes(grad),
        "dense_grad_A_bytes": num_embeddings * R * 4,
    }


def run_memory_probe(num_embeddings: int) -> dict:
    """:func:`memory_probe` in a fresh process."""
    return run_json_subprocesses([[sys.executable, __file__, "--memory-probe", str(num_embeddings)]], timeout=300)[0]


def test_backward_memory_independent_of_V(request, bench, report):
    bench.skip_if_not_timing(request.config)
    if not can_measure_memory():
        pytest.skip("needs Linux /proc/self/clear_refs to reset the resident-set high-water mark")
    small, large = (run_memory_probe(v) for v in MEMORY_SIZES)
    mib = 2**20
    for probe in (small, large):
        print(
            f"\nV={probe['V']:>9,}: backward peak extra {probe['backward_peak_extra_bytes'] / mib:6.2f} MiB, "
            f"retained {probe['backward_retained_bytes'] / mib:6.2f} MiB, grad A "
            f"{'sparse' if probe['grad_A_sparse'] else 'DENSE'} {probe['grad_A_bytes'] / mib:.2f} MiB "
            f"(a dense grad A: {probe['dense_grad_A_bytes'] / mib:.1f} MiB)"
        )
    growth = large["backward_peak_extra_bytes"] / max(small["backward_peak_extra_bytes"], 1)
    report.extra["backward_memory"] = {
        "probes": [small, large],
        "growth_ratio": round(growth, 3),
        "method": "VmHWM - VmRSS around loss.backward(), fresh subprocess, "
        f"MALLOC_MMAP_THRESHOLD_={MALLOC_MMAP_THRESHOLD}",
    }
    assert large["grad_A_sparse"], "the gradient of A is dense"
    # Page-granular RSS and allocator noise: allow 1.5x plus 1 MiB.
    assert large["backward_peak_extra_bytes"] <= 1.5 * small["backward_peak_extra_bytes"] + mib, (
        f"backward memory grows with V: {small['backward_peak_extra_bytes']} -> "
        f"{large['backward_peak_extra_bytes']} bytes"
    )
    assert large["backward_peak_extra_bytes"] < large["dense_grad_A_bytes"] / 4, (
        "backward memory is not well below a dense gradient of A"
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory-probe":
        print(json.dumps(memory_probe(int(sys.argv[2]))))
    else:
        sys.exit("usage: python benchmarks/bench_lora_embedding_bag.py --memory-probe V")
