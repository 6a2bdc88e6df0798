"""GPU section: many adapters in one batch, the segmented ops (kernels/segmented_lora.py).

First checks, on CUDA, the segmented linear and bag ops (stacked adapters, unequal use, rows of
no adapter) against the reference op in float64 and raises on a mismatch, so nothing is timed
then. Then times, side by side, an inference pass of the issue-16 tower in bf16: a bag over a
table of V = 1,000,000 rows, D = 128, 32 ids per bag, concatenated with dense features to K =
512, then three 512 → 512 layers (ReLU between), r = 16, B = 8192 rows, each row's adapter
uniform over n ∈ {1, 64, 256, 1024}:

    merged     the tower with one adapter merged (plain F.embedding_bag and F.linear): the floor
    segmented  the segmented ops: every row through its own adapter, one launch per op
    loop       the grouped eager loop: rows sorted by adapter once, then per adapter its slice's
               s·(x·Aᵀ)·Bᵀ and its bags' s·(Σ A[i])·B in torch ops (HF PEFT's mixed batch)

Throughput = B / time. Targets (issue 16, H200): segmented ≥ 0.8x merged's throughput at 256
adapters, and ≥ 10x the loop's.
"""

from __future__ import annotations

import dataclasses
import sys

import torch
import torch.nn.functional as F

from recpeft.kernels import BagLayout, bag_layout, dispatch, reference

from .common import bench_ms, check_close, print_table

FULL = dict(rows=8192, vocab=1_000_000, dim=128, bag_len=32, width=512, layers=3, rank=16, adapters=(1, 64, 256, 1024))
QUICK = dict(FULL, rows=2048, vocab=100_000, adapters=(1, 64, 256))
SCALE = 2.0
TARGET_X_MERGED = 0.8  # throughput at 256 adapters, segmented over merged
TARGET_X_LOOP = 10.0
# bf16 operands, fp32 sums, a bf16 result: within a few bf16 ulps (2^-8, and 2^-7 where the
# interpreter truncates) of the largest value; a wrong row, adapter or scale errs by O(1) of it.
CHECK_REL = 2.0**-5


def _segmented():
    return sys.modules[dispatch.triton_op("segmented_lora_linear_stacked").__module__]


def _tower(shape, n, device, dtype, seed=0):
    """The tower's weights and one batch, with ``n`` stacked adapters per layer and on the bag."""
    g = torch.Generator(device=device).manual_seed(seed)
    # drawn in the dtype itself and scaled in place: the stacked tables reach 32 GiB at 1024 adapters
    rnd = lambda *s, std=1.0: torch.randn(*s, generator=g, device=device, dtype=dtype).mul_(std)  # noqa: E731
    rows, vocab, dim, length, width, rank = (shape[k] for k in ("rows", "vocab", "dim", "bag_len", "width", "rank"))
    layers = [(rnd(width, width, std=width**-0.5), rnd(width, std=0.1)) for _ in range(shape["layers"])]
    adapters = [(rnd(n, rank, width, std=width**-0.5), rnd(n, width, rank, std=rank**-0.5)) for _ in layers]
    table = rnd(vocab, dim, std=0.1)
    bag_adapters = (rnd(n, vocab, rank, std=0.1), rnd(n, rank, dim, std=rank**-0.5))
    ids = torch.randint(0, vocab, (rows * length,), generator=g, device=device)
    offsets = torch.arange(rows, device=device) * length
    layout = bag_layout(ids, offsets, num_embeddings=vocab, weight_dtype=dtype)
    return {
        "layers": layers,
        "adapters": adapters,
        "table": table,
        "bag_adapters": bag_adapters,
        "ids": ids,
        "offsets": offsets,
        "layout": layout,
        "dense": rnd(rows, width - dim),
        "row_adapter": torch.randint(0, n, (rows,), generator=g, device=device),
        "scales": torch.full((n,), SCALE, device=device),
    }


def _merged(t):
    """The tower with adapter 0 merged into every weight (the floor)."""
    pooled = F.embedding_bag(t["ids"], t["merged_table"], t["offsets"], mode="sum")
    h = torch.cat([t["dense"], pooled], dim=1)
    for i, (w, b) in enumerate(t["merged_layers"]):
        h = F.linear(h, w, b)
        h = torch.relu(h) if i < len(t["merged_layers"]) - 1 else h
    return h


def _merge(t):
    """W + s·B_0·A_0 per layer, E + s·A_0·B_0 for the table."""
    t["merged_layers"] = [(w + SCALE * (b_[0] @ a[0]), b) for (w, b), (a, b_) in zip(t["layers"], t["adapters"])]
    a, b = t["bag_adapters"]
    t["merged_table"] = t["table"] + SCALE * (a[0] @ b[0])


def _segmented_pass(t, ops):
    """Every row through its own adapter with the segmented ops (``ops``: the Triton module or
    the reference)."""
    base = F.embedding_bag(t["ids"], t["table"], t["offsets"], mode="sum")
    pooled = ops.segmented_lora_bag_stacked(t["layout"], *t["bag_adapters"], t["scales"], t["row_adapter"], base)
    h = torch.cat([t["dense"], pooled.to(t["dense"].dtype)], dim=1)
    for i, ((w, b), (a, b_)) in enumerate(zip(t["layers"], t["adapters"])):
        h = ops.segmented_lora_linear_stacked(h, w, b, a, b_, t["scales"], t["row_adapter"])
        h = torch.relu(h) if i < len(t["layers"]) - 1 else h
    return h


def _loop_pass(t):
    """The grouped eager loop: one sort, then per adapter its rows' product in torch ops."""
    order = torch.argsort(t["row_adapter"])
    counts = torch.bincount(t["row_adapter"], minlength=t["scales"].numel()).tolist()
    groups = [(a, rows) for a, rows in enumerate(torch.split(order, counts)) if rows.numel()]
    length = t["ids"].numel() // t["dense"].shape[0]
    pooled = F.embedding_bag(t["ids"], t["table"], t["offsets"], mode="sum")
    a_tab, b_tab = t["bag_adapters"]
    for a, rows in groups:
        bag_ids = t["ids"].view(-1, length).index_select(0, rows)
        delta = F.embedding_bag(bag_ids, a_tab[a], mode="sum") @ b_tab[a]
        pooled = pooled.index_add(0, rows, SCALE * delta)
    h = torch.cat([t["dense"], pooled], dim=1)
    for i, ((w, b), (a_, b_)) in enumerate(zip(t["layers"], t["adapters"])):
        y = F.linear(h, w, b)
        for a, rows in groups:
            x = h.index_select(0, rows)
            y = y.index_add(0, rows, SCALE * F.linear(F.linear(x, a_[a]), b_[a]))
        h = torch.relu(y) if i < len(t["layers"]) - 1 else y
    return h


def _check(ops, device):
    """Each segmented op (Triton) on a small tower's bf16 operands against the reference op on
    the same values in float64: the bag, then every layer (its input the previous check's
    float64 output, rounded to bf16 as the pass would feed it)."""
    shape = dict(rows=96, vocab=500, dim=32, bag_len=5, width=64, layers=3, rank=16)
    t = _tower(shape, 7, device, torch.bfloat16, seed=3)
    t64 = {k: _double(v) for k, v in t.items()}
    base = F.embedding_bag(t["ids"], t["table"], t["offsets"], mode="sum")
    got = ops.segmented_lora_bag_stacked(t["layout"], *t["bag_adapters"], t["scales"], t["row_adapter"], base)
    expected = reference.segmented_lora_bag_stacked(
        t64["layout"], *t64["bag_adapters"], t64["scales"], t["row_adapter"], base.double()
    )
    _close("segmented bag", got, expected)
    h = torch.cat([t["dense"], expected.to(torch.bfloat16)], dim=1)
    for i, ((w, b), (a, b_)) in enumerate(zip(t["layers"], t["adapters"])):
        got = ops.segmented_lora_linear_stacked(h, w, b, a, b_, t["scales"], t["row_adapter"])
        expected = reference.segmented_lora_linear_stacked(
            *(_double(v) for v in (h, w, b, a, b_, t["scales"])), t["row_adapter"]
        )
        _close(f"segmented linear {i}", got, expected)
        unadapted = F.linear(h.double(), w.double(), b.double())
        assert (expected - unadapted).abs().max() > 0.1, f"layer {i}: the adapters barely matter"
        h = torch.relu(expected).to(torch.bfloat16)
    return {"rows": shape["rows"], "adapters": 7, "tolerance": f"{CHECK_REL} of max |value|"}


def _close(what, got, expected):
    """|got − expected| ≤ CHECK_REL·max|expected| elementwise (bf16 results of fp32 sums)."""
    limit = CHECK_REL * float(expected.abs().max())
    check_close(what, got, expected, rtol=0.0, atol=limit)


def _double(value):
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, (list, tuple)):
        return type(value)(_double(v) for v in value)
    if isinstance(value, BagLayout):  # its weights, if any
        return dataclasses.replace(value, weights=None if value.weights is None else value.weights.double())
    return value


def _time(shape, n, ops, timer, device):
    t = _tower(shape, n, device, torch.bfloat16)
    _merge(t)
    merged = timer(lambda: _merged(t))
    segmented = timer(lambda: _segmented_pass(t, ops))
    loop = timer(lambda: _loop_pass(t))
    rows = shape["rows"]
    return {
        "adapters": n,
        "merged_ms": merged,
        "segmented_ms": segmented,
        "loop_ms": loop,
        "rows_per_s_segmented": rows / segmented * 1e3,
        "x_merged_throughput": merged / segmented,
        "x_loop_speedup": loop / segmented,
    }


def measure(shape, device, timer) -> dict:
    """The check, then a row per adapter count (``timer(fn) -> ms``)."""
    ops = _segmented()
    result = {"shape": shape, "scale": SCALE, "check": _check(ops, device), "rows": []}
    for n in shape["adapters"]:
        result["rows"].append(_time(shape, n, ops, timer, device))
        if device == "cuda":
            torch.cuda.empty_cache()
    at = next((r for r in result["rows"] if r["adapters"] == 256), None)
    result["targets"] = {
        f"segmented >= {TARGET_X_MERGED}x merged throughput at 256 adapters": None
        if at is None
        else at["x_merged_throughput"] >= TARGET_X_MERGED,
        f"segmented >= {TARGET_X_LOOP}x the loop at 256 adapters": None
        if at is None
        else at["x_loop_speedup"] >= TARGET_X_LOOP,
    }
    return result


def run(env: dict, quick: bool) -> dict:
    shape = QUICK if quick else FULL
    result = measure(shape, "cuda", bench_ms)
    print_table(
        f"segmented tower, bf16, B={shape['rows']:,}, bag V={shape['vocab']:,} D={shape['dim']} x{shape['bag_len']}, "
        f"{shape['layers']}x{shape['width']}, r={shape['rank']}",
        result["rows"],
        ["adapters", "merged_ms", "segmented_ms", "loop_ms", "x_merged_throughput", "x_loop_speedup"],
    )
    for name, met in result["targets"].items():
        print(f"{'met' if met else 'MISSED' if met is False else 'n/a':>6}  {name}")
    return result
