"""Segmented LoRA (kernels/segmented_lora.py) and the stacked reference ops (kernels/reference.py)
against a float64 loop written here: one unfused product per adapter, on that adapter's rows (or
bags) alone, at the adapter's own rank. Output and every gradient (x, A, B; the base output of a
bag), for random assignments with −1, one adapter for all, every row its own adapter, empty
groups, unequal ranks (padded in the stacks), one odd shape; the dropout mask; the layers' list
form, whose per-adapter parameters must each get their own gradient; a routed LoraLinear,
LoraEmbeddingBag and LoraEmbedding with RECPEFT_BACKEND=triton against the torch path. On CPU the
kernels run under TRITON_INTERPRET=1 (tests/conftest.py); on a CUDA machine the same tests run
compiled.
"""

import dataclasses
import importlib

import pytest
import torch
from torch import nn

from recpeft.kernels import AdapterWeights, bag_layout, reference, unpooled_layout
from recpeft.kernels.launch import INTERPRETING
from recpeft.kernels.lora_linear import draw_dropout_seed, dropout_keep_scale
from recpeft.layers import LoraEmbedding, LoraEmbeddingBag, LoraLinear
from recpeft.layers.routing import Routing, routed

from reference_math import abs_inputs, abs_twin, assert_bound_can_fail, assert_within_bound, dense_grad

seg = importlib.import_module("recpeft.kernels.segmented_lora")
grouped = importlib.import_module("recpeft.kernels.grouped")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(
    DEVICE == "cpu" and not INTERPRETING,
    reason="Triton runs CPU tensors only under TRITON_INTERPRET=1 (conftest sets it without CUDA)",
)
SCALES = (-1.3, 0.7, 2.0, -0.4, 1.1)  # one negative at least: a kernel that drops a sign fails

# Error bound (reference_math.assert_within_bound, computed=1: the expectation is float64):
# |got − exact| ≤ γ_n·Σ|terms|, Σ|terms| being the same loop on absolute values. n counts the
# roundings along the longest chain of one monomial.
# float32: every kernel sums in float32, in any order (tiles, atomics): y is K (x·Wᵀ, torch) or
#   K + R + 2 (u, s·u, ·B, + base) long; dX N + R + N + 2; dA Σ over the adapter's rows (≤ M) of
#   v (N) times x: M + N + 2; dB M + K + 2. n = M + K + N + R + 8 bounds them all.
# bfloat16 / float16 (in their own unit roundoff u; the float32 sums above add < 0.01·u): the
#   base GEMM rounds once (torch's CPU GEMM accumulates in float32: measured < 0.7·u at K ≤ 512),
#   s·u (s·v) is rounded to the dtype before its tl.dot, and the result once more when stored;
#   the interpreter converts float32 → bf16 by truncation (≤ 2·u, the GPU rounds: ≤ u). Along any
#   chain that is at most 2 + 2 + 1 conversions (dA, dB: s·v, then torch's cast of the float32
#   sum): 5·u; n = 6.
LOW_PRECISION_ROUNDINGS = 6
LOW_PRECISION = (torch.bfloat16, torch.float16)


def roundings(dtype, *sizes) -> int:
    return sum(sizes) + 8 if dtype == torch.float32 else LOW_PRECISION_ROUNDINGS


def check(name, got, expected, bound, n, dtype):
    assert_within_bound(got, expected, bound, n, dtype, computed=1, name=name)


def check_adapter_grads(got, expected, bound, n, dtype):
    """Each adapter's A and B gradient (lists "As", "Bs"; sparse ones densified) against the loop's.
    No gradient (None) on either side must mean zero on the other: an adapter without rows."""
    for part in ("As", "Bs"):
        for a, (ours, theirs, limit) in enumerate(zip(got[part], expected[part], bound[part])):
            if theirs is None or ours is None:
                other = ours if theirs is None else theirs
                assert other is None or not dense_grad(other).any(), f"d{part}[{a}]: one side has no gradient"
                continue
            check(f"d{part}[{a}]", dense_grad(ours), theirs, limit, n, dtype)


# ---------------------------------------------------------------------------------------------
# The float64 loop
# ---------------------------------------------------------------------------------------------


def loop_linear(x, W, b, As, Bs, scales, ids, keep=None):
    """y = x·Wᵀ + b; then, adapter by adapter, on its rows alone:
    y[rows] += s_a·(d(x[rows])·A_aᵀ)·B_aᵀ with A_a [r_a, K], B_a [N, r_a] unpadded."""
    y = x @ W.t() + (0 if b is None else b)
    for a, (A, B, s) in enumerate(zip(As, Bs, scales)):
        rows = (ids == a).nonzero().squeeze(1)
        x_a = x[rows] if keep is None else x[rows] * keep[rows]
        y = y.index_add(0, rows, s * (x_a @ A.t()) @ B.t())
    return y


def loop_bag(layout, As, Bs, scales, bag_adapter, base):
    """Bag by bag: base_j, plus s_a·(Σ_{i∈I_j} w_i·A_a[i])·B_a when the bag has adapter a."""
    ends = torch.cat([layout.offsets[1:], torch.tensor([layout.ids.numel()])]).tolist()
    rows = []
    for j, (start, end) in enumerate(zip(layout.offsets.tolist(), ends)):
        a = int(bag_adapter[j])
        if a < 0:
            rows.append(base[j])
            continue
        ids = layout.ids[start:end]
        w = layout.weights[start:end].double() if layout.weights is not None else torch.ones(end - start).double()
        rows.append(base[j] + scales[a] * (w[:, None] * As[a][ids]).sum(0) @ Bs[a])
    return torch.stack(rows)


def run64(fn, leaves, grad, absolute):
    """fn on float64 copies of ``leaves`` (absolute values when ``absolute``), then backward(grad):
    (output, gradients) — the expectation, or its bound Σ|terms|."""
    f = (lambda t: t.double().abs()) if absolute else (lambda t: t.double())
    copies = [f(t.detach().cpu()).requires_grad_(True) for t in leaves]
    out = fn(copies, absolute)
    out.backward(f(grad.cpu()))
    return out.detach(), [c.grad for c in copies]


# ---------------------------------------------------------------------------------------------
# Linear
# ---------------------------------------------------------------------------------------------


def ids_random(m, n, g):
    return torch.randint(-1, n, (m,), generator=g)


def ids_one_adapter(m, n, g):
    return torch.zeros(m, dtype=torch.int64)


def ids_own_adapter(m, n, g):
    return torch.randperm(m, generator=g)  # n == m


def ids_empty_groups(m, n, g):
    return torch.tensor([-1, 1, 3])[torch.randint(0, 3, (m,), generator=g)]  # adapters 0 and 2: no rows


def ids_none(m, n, g):
    return torch.full((m,), -1)


# name: (M, K, N, ranks, ids, bias)
LINEAR_CASES = {
    "random with -1": (37, 29, 23, (3, 5, 1, 4), ids_random, True),
    "one adapter for all": (20, 16, 18, (6,), ids_one_adapter, True),
    "every row its own adapter": (9, 12, 10, (2, 3, 4, 5, 6, 7, 8, 1, 2), ids_own_adapter, True),
    "empty groups": (30, 21, 17, (2, 7, 3, 5), ids_empty_groups, True),
    "no row routed": (6, 8, 5, (3, 2), ids_none, True),
    "unequal ranks past 16": (25, 20, 33, (1, 17, 4), ids_random, True),
    "odd shape": (3, 1, 70, (2, 9), ids_random, False),
}


def linear_case(name, dtype, seed=0):
    m, k, n_out, ranks, ids_fn, bias = LINEAR_CASES[name]
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    return {
        "x": rnd(m, k),
        "weight": rnd(n_out, k),
        "bias": rnd(n_out) if bias else None,
        "As": [rnd(r, k) for r in ranks],
        "Bs": [rnd(n_out, r) for r in ranks],
        "scales": [SCALES[a % len(SCALES)] for a in range(len(ranks))],
        "ids": ids_fn(m, len(ranks), g).to(DEVICE),
        "grad_y": rnd(m, n_out),
    }


def stacked(factors, rank, dim):
    """Zero-padded to ``rank`` along ``dim`` and stacked — written here, not the op's helper."""
    out = factors[0].new_zeros(len(factors), *(rank if d == dim else s for d, s in enumerate(factors[0].shape)))
    for a, t in enumerate(factors):
        out[a].narrow(dim, 0, t.shape[dim]).copy_(t)
    return out


def linear_expectation(case, keep=None):
    """(expected, bound): each a dict of y, x, and the lists As, Bs of per-adapter gradients."""
    n = len(case["As"])
    leaves = [case["x"], *case["As"], *case["Bs"]]

    def fn(t, absolute):
        scales = [abs(s) if absolute else s for s in case["scales"]]
        W, b = (
            None if v is None else (v.double().abs() if absolute else v.double()).cpu()
            for v in (case["weight"], case["bias"])
        )
        k = None if keep is None else keep.double()
        return loop_linear(t[0], W, b, t[1 : 1 + n], t[1 + n :], scales, case["ids"].cpu(), k)

    results = []
    for absolute in (False, True):
        y, grads = run64(fn, leaves, case["grad_y"], absolute)
        results.append({"y": y, "x": grads[0], "As": grads[1 : 1 + n], "Bs": grads[1 + n :]})
    return results


def check_linear(case, got, expected, bound):
    """got: y, x and per-adapter gradients As / Bs (a None entry means no gradient)."""
    x, dtype = case["x"], case["x"].dtype
    m, k = x.shape
    n_out, rank = case["weight"].shape[0], max(a.shape[0] for a in case["As"])
    n = roundings(dtype, m, k, n_out, rank)
    check("y", got["y"], expected["y"], bound["y"], n, dtype)
    assert_bound_can_fail(expected["y"], bound["y"], n, dtype, computed=1, name="y")
    check("dX", got["x"], expected["x"], bound["x"], n, dtype)
    check_adapter_grads(got, expected, bound, n, dtype)


def run_stacked_linear(op, case, dropout_p=None):
    """The stacked op on padded stacks; per-adapter gradients are the unpadded slices, and the
    padding's gradient must be exactly zero."""
    ranks = [a.shape[0] for a in case["As"]]
    rank = max(ranks)
    x = case["x"].clone().requires_grad_(True)
    lora_A = stacked(case["As"], rank, 0).requires_grad_(True)
    lora_B = stacked(case["Bs"], rank, 1).requires_grad_(True)
    scales = torch.tensor(case["scales"], device=DEVICE)
    y = op(x, case["weight"], case["bias"], lora_A, lora_B, scales, case["ids"], dropout_p)
    y.backward(case["grad_y"])
    for a, r in enumerate(ranks):
        assert not lora_A.grad[a, r:].any() and not lora_B.grad[a, :, r:].any(), "padding got a gradient"
    return {
        "y": y,
        "x": x.grad,
        "As": [lora_A.grad[a, :r] for a, r in enumerate(ranks)],
        "Bs": [lora_B.grad[a, :, :r] for a, r in enumerate(ranks)],
    }


IMPLEMENTATIONS = {"triton": seg.segmented_lora_linear_stacked, "reference": reference.segmented_lora_linear_stacked}
LINEAR_RUNS = [(c, torch.float32, impl) for c in LINEAR_CASES for impl in IMPLEMENTATIONS] + [
    (c, dtype, "triton") for c in ("random with -1", "unequal ranks past 16") for dtype in LOW_PRECISION
]


@pytest.mark.parametrize("name,dtype,impl", LINEAR_RUNS, ids=[f"{c}-{str(d)[6:]}-{i}" for c, d, i in LINEAR_RUNS])
def test_stacked_linear_matches_the_per_adapter_loop(name, dtype, impl):
    case = linear_case(name, dtype)
    expected, bound = linear_expectation(case)
    check_linear(case, run_stacked_linear(IMPLEMENTATIONS[impl], case), expected, bound)


def test_list_form_gives_each_adapter_its_own_gradient():
    """The layers' form: per-adapter parameters (unequal ranks, one adapter the layer lacks, one
    without rows) each get the gradient of their own rows; the one without rows gets none, as
    on the torch path."""
    case = linear_case("empty groups", torch.float32, seed=3)
    expected, bound = linear_expectation(case)
    x = case["x"].clone().requires_grad_(True)
    leaves = [(A.clone().requires_grad_(True), B.clone().requires_grad_(True)) for A, B in zip(case["As"], case["Bs"])]
    adapters = [AdapterWeights(A, B, s) for (A, B), s in zip(leaves, case["scales"])]
    adapters[2] = None  # a routed name this layer has no adapter for: its rows (none here) get the base
    expected["As"][2], expected["Bs"][2] = torch.zeros_like(expected["As"][2]), torch.zeros_like(expected["Bs"][2])
    y = seg.segmented_lora_linear(x, case["weight"], case["bias"], adapters, case["ids"])
    y.backward(case["grad_y"])
    got = {"y": y, "x": x.grad, "As": [A.grad for A, _ in leaves], "Bs": [B.grad for _, B in leaves]}
    assert got["As"][0] is None and got["Bs"][0] is None  # adapter 0 has no rows
    check_linear(case, got, expected, bound)


def test_a_missing_adapter_leaves_its_rows_at_the_base_output():
    case = linear_case("random with -1", torch.float32, seed=4)
    adapters = [AdapterWeights(A, B, s) for A, B, s in zip(case["As"], case["Bs"], case["scales"])]
    adapters[1] = None
    case["As"][1], case["Bs"][1] = case["As"][1] * 0, case["Bs"][1] * 0
    expected, bound = linear_expectation(case)
    y = seg.segmented_lora_linear(case["x"], case["weight"], case["bias"], adapters, case["ids"])
    m, k = case["x"].shape
    n = roundings(torch.float32, m, k, case["weight"].shape[0], 5)
    check("y", y, expected["y"], bound["y"], n, torch.float32)


def test_dropout_is_the_linear_ops_mask_with_each_adapters_p():
    """Row i drops with its adapter's p (0 for one of them), by the linear op's counter-based mask
    regenerated from the seed the op draws from torch's generator: forward, dX and dA alike."""
    case = linear_case("random with -1", torch.float32, seed=5)
    p = torch.tensor([0.3, 0.0, 0.5, 0.2])
    torch.manual_seed(77)
    got = run_stacked_linear(seg.segmented_lora_linear_stacked, case, p.to(DEVICE))
    torch.manual_seed(77)
    seed = draw_dropout_seed()
    m, k = case["x"].shape
    masks = torch.stack([dropout_keep_scale(seed, m, k, float(q), DEVICE).cpu() for q in p])  # [n, M, K]
    keep = masks[case["ids"].cpu().clamp(min=0), torch.arange(m)]
    assert (keep == 0).any(), "nothing dropped: the check would not see the mask"
    expected, bound = linear_expectation(case, keep)
    check_linear(case, got, expected, bound)


def test_reference_dropout_touches_only_rows_whose_adapter_drops():
    case = linear_case("random with -1", torch.float32, seed=6)
    p = torch.tensor([0.0, 0.5, 0.0, 0.0])
    got = run_stacked_linear(reference.segmented_lora_linear_stacked, case, p)
    expected, bound = linear_expectation(case)
    rows = case["ids"] != 1
    m, k = case["x"].shape
    n = roundings(torch.float32, m, k, case["weight"].shape[0], 5)
    check("y (no dropout)", got["y"][rows], expected["y"][rows], bound["y"][rows], n, torch.float32)
    assert not torch.allclose(got["y"][~rows].double(), expected["y"][~rows]), "adapter 1 did not drop"


def test_the_plan_tiles_every_adapters_rows_once():
    """segment_plan against a direct count: each tile lies in one adapter's group and holds at
    most block_m rows, and the tiles cover each adapter's rows exactly once (no −1 row)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(-1, 6, (200,), generator=g)
    ids[ids == 4] = -1  # an empty group
    plan = reference.segment_plan(ids, 6, 16)
    rows = reference.plan_tile_rows(plan, ids.numel())
    assert plan.num_tiles == -(-200 // 16) + 6
    covered = []
    for t in range(plan.num_tiles):
        held = rows[t][rows[t] < ids.numel()]
        a = int(plan.tile_adapter[t])
        assert a >= 0 or held.numel() == 0
        assert held.numel() <= 16 and bool((ids[held] == a).all())
        covered += held.tolist()
    assert sorted(covered) == (ids >= 0).nonzero().squeeze(1).tolist()


def test_bad_operands_are_one_line_errors():
    case = linear_case("random with -1", torch.float32)
    x, W, b = case["x"], case["weight"], case["bias"]
    A, B = stacked(case["As"], 5, 0), stacked(case["Bs"], 5, 1)
    s = torch.tensor(case["scales"])
    for op in IMPLEMENTATIONS.values():
        with pytest.raises(ValueError, match=r"lora_B has shape \(4, 5, 23\), expected"):
            op(x, W, b, A, B.transpose(1, 2), s, case["ids"])
        with pytest.raises(ValueError, match=r"scales must be a \[4\] tensor"):
            op(x, W, b, A, B, s[:3], case["ids"])
        with pytest.raises(TypeError, match="adapter ids must be a 1-D int32/int64 tensor"):
            op(x, W, b, A, B, s, case["ids"].float())
    with pytest.raises(TypeError, match="lora_A is torch.float16"):
        seg.segmented_lora_linear_stacked(x, W, b, A.half(), B, s, case["ids"])


# ---------------------------------------------------------------------------------------------
# Embedding bag and plain lookups
# ---------------------------------------------------------------------------------------------

VOCAB, DIM = 40, 19


def layout_weighted_sum(g):
    """Sum pooling of 1-D ids with per-sample weights, empty bags included."""
    offsets = torch.tensor([0, 3, 3, 10, 11, 20, 20, 26, 30, 36])
    ids = torch.randint(0, VOCAB, (41,), generator=g)
    return bag_layout(ids, offsets, num_embeddings=VOCAB, per_sample_weights=torch.rand(41, generator=g))


def layout_mean_padding(g):
    ids = torch.randint(0, VOCAB, (12, 5), generator=g)
    ids[0] = 0  # a bag of padding only: empty
    return bag_layout(ids, None, num_embeddings=VOCAB, mode="mean", padding_idx=0)


def layout_plain_lookup(g):
    """nn.Embedding's lookup: every id its own bag (a padding id an empty bag)."""
    return unpooled_layout(torch.randint(0, VOCAB, (14,), generator=g), padding_idx=3)


# name: (layout, ranks, bag adapter ids)
BAG_CASES = {
    "weighted sums, -1 and empty bags": (layout_weighted_sum, (3, 5, 2), ids_random),
    "mean with padding": (layout_mean_padding, (4, 1, 6, 2), ids_empty_groups),
    "plain lookup": (layout_plain_lookup, (2, 7), ids_random),
    "one adapter for all": (layout_weighted_sum, (4,), ids_one_adapter),
    "every bag its own adapter": (layout_mean_padding, (2,) * 12, ids_own_adapter),
}


def bag_case(name, dtype, seed=0):
    layout_fn, ranks, ids_fn = BAG_CASES[name]
    g = torch.Generator().manual_seed(seed)
    layout = layout_fn(g)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(dtype).to(DEVICE)  # noqa: E731
    nb = layout.num_bags
    to_device = {f: getattr(layout, f).to(DEVICE) for f in ("ids", "bag_of_id", "offsets")}
    weights = layout.weights.to(dtype).to(DEVICE) if layout.weights is not None else None
    return {
        "layout": type(layout)(**to_device, weights=weights, num_bags=nb),
        "As": [rnd(VOCAB, r) for r in ranks],
        "Bs": [rnd(r, DIM) for r in ranks],
        "scales": [SCALES[a % len(SCALES)] for a in range(len(ranks))],
        "ids": ids_fn(nb, len(ranks), g).to(DEVICE),
        "base": rnd(nb, DIM),
        "grad": rnd(nb, DIM),
    }


def bag_expectation(case):
    n = len(case["As"])
    layout = case["layout"]
    cpu = type(layout)(
        layout.ids.cpu(),
        layout.bag_of_id.cpu(),
        layout.offsets.cpu(),
        layout.weights.cpu() if layout.weights is not None else None,
        layout.num_bags,
    )

    def fn(t, absolute):
        scales = [abs(s) if absolute else s for s in case["scales"]]
        lay = cpu if not absolute or cpu.weights is None else dataclasses.replace(cpu, weights=cpu.weights.abs())
        return loop_bag(lay, t[1 : 1 + n], t[1 + n :], scales, case["ids"].cpu(), t[0])

    results = []
    for absolute in (False, True):
        out, grads = run64(fn, [case["base"], *case["As"], *case["Bs"]], case["grad"], absolute)
        results.append({"out": out, "base": grads[0], "As": grads[1 : 1 + n], "Bs": grads[1 + n :]})
    return results


def check_bag(case, got, expected, bound):
    dtype = case["base"].dtype
    layout = case["layout"]
    longest = int(torch.bincount(layout.bag_of_id.cpu(), minlength=1).max()) if layout.ids.numel() else 0
    n = roundings(dtype, longest, max(a.shape[1] for a in case["As"]), DIM, layout.num_bags)
    check("out", got["out"], expected["out"], bound["out"], n, dtype)
    assert_bound_can_fail(expected["out"] - case["base"].double().cpu(), bound["out"], n, dtype, 1, "delta")
    check("dbase", got["base"], expected["base"], bound["base"], n, dtype)
    check_adapter_grads(got, expected, bound, n, dtype)


def test_a_table_gradient_is_sparse_over_the_batchs_ids():
    case = bag_case("weighted sums, -1 and empty bags", torch.float32)
    tables = [A.clone().requires_grad_(True) for A in case["As"]]
    adapters = [AdapterWeights(A, B, s) for A, B, s in zip(tables, case["Bs"], case["scales"])]
    seg.segmented_lora_bag_delta(case["layout"], adapters, case["ids"], DIM, torch.float32).pow(2).sum().backward()
    for a, table in enumerate(tables):
        if table.grad is None:
            continue
        assert table.grad.is_sparse
        bags = (case["ids"] == a).nonzero().squeeze(1)
        used = case["layout"].ids[torch.isin(case["layout"].bag_of_id, bags)]
        assert set(table.grad.coalesce().indices()[0].tolist()) == set(used.tolist())


def run_stacked_bag(op, case):
    ranks = [a.shape[1] for a in case["As"]]
    rank = max(ranks)
    lora_A = stacked(case["As"], rank, 1).requires_grad_(True)
    lora_B = stacked(case["Bs"], rank, 0).requires_grad_(True)
    base = case["base"].clone().requires_grad_(True)
    out = op(case["layout"], lora_A, lora_B, torch.tensor(case["scales"], device=DEVICE), case["ids"], base)
    out.backward(case["grad"])
    grad_a = dense_grad(lora_A.grad)
    for a, r in enumerate(ranks):
        assert not grad_a[a, :, r:].any() and not lora_B.grad[a, r:].any(), "padding got a gradient"
    return {
        "out": out,
        "base": base.grad,
        "As": [grad_a[a, :, :r] for a, r in enumerate(ranks)],
        "Bs": [lora_B.grad[a, :r] for a, r in enumerate(ranks)],
    }


BAG_IMPLEMENTATIONS = {"triton": seg.segmented_lora_bag_stacked, "reference": reference.segmented_lora_bag_stacked}
BAG_RUNS = [(c, torch.float32, impl) for c in BAG_CASES for impl in BAG_IMPLEMENTATIONS] + [
    ("weighted sums, -1 and empty bags", dtype, "triton") for dtype in LOW_PRECISION
]


@pytest.mark.parametrize("name,dtype,impl", BAG_RUNS, ids=[f"{c}-{str(d)[6:]}-{i}" for c, d, i in BAG_RUNS])
def test_stacked_bag_matches_the_per_adapter_loop(name, dtype, impl):
    case = bag_case(name, dtype)
    expected, bound = bag_expectation(case)
    check_bag(case, run_stacked_bag(BAG_IMPLEMENTATIONS[impl], case), expected, bound)


@pytest.mark.parametrize("name", ["weighted sums, -1 and empty bags", "mean with padding", "plain lookup"])
def test_bag_list_form_reads_each_table_in_place(name):
    """The layers' form: one [V, r_a] table per adapter (unequal ranks, not stacked), a routed
    name the layer lacks; each table gets a sparse gradient of its own rows, or none."""
    case = bag_case(name, torch.float32, seed=1)
    expected, bound = bag_expectation(case)
    tables = [A.clone().requires_grad_(True) for A in case["As"]]
    Bs = [B.clone().requires_grad_(True) for B in case["Bs"]]
    adapters = [AdapterWeights(A, B, s) for A, B, s in zip(tables, Bs, case["scales"])] + [None]
    delta = seg.segmented_lora_bag_delta(case["layout"], adapters, case["ids"], DIM, torch.float32)
    out = case["base"] + delta
    out.backward(case["grad"])
    got = {"out": out, "base": case["grad"], "As": [t.grad for t in tables], "Bs": [B.grad for B in Bs]}
    check_bag(case, got, expected, bound)


# ---------------------------------------------------------------------------------------------
# The routed layers: RECPEFT_BACKEND=triton against the torch path
# ---------------------------------------------------------------------------------------------

ROUTED_NAMES = ("a", "b", "missing", "c")  # "missing": routed, but the layer has no such adapter
LAYER_RANKS = {"a": 2, "b": 5, "c": 3}


def _with_adapters(layer):
    for name, r in LAYER_RANKS.items():
        layer.update_layer(name, r=r, scale=SCALES[r % len(SCALES)], dropout=0.0, init=False)
    return layer.to(DEVICE)


def _routed_run(layer, inputs, ids, backend, monkeypatch):
    monkeypatch.setenv("RECPEFT_BACKEND", backend)
    layer.zero_grad(set_to_none=True)
    with routed(ids, ROUTED_NAMES):
        out = layer(*inputs)
    out.pow(2).sum().backward()
    grads = {n: dense_grad(p.grad) for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), grads


@pytest.mark.parametrize("kind", ["linear", "embedding_bag", "embedding"])
def test_routed_layer_gives_the_torch_paths_numbers_on_the_triton_path(kind, monkeypatch):
    g = torch.Generator().manual_seed(11)
    ids = torch.tensor([0, 1, -1, 3, 2, 0, 3, 1, 0])  # every routed name, the missing one too
    if kind == "linear":
        layer = _with_adapters(LoraLinear(nn.Linear(13, 7), "fc"))
        inputs = (torch.randn(9, 4, 13, generator=g).to(DEVICE),)  # 4 rows per sample
        rows = 9 * 4
    elif kind == "embedding_bag":
        layer = _with_adapters(LoraEmbeddingBag(nn.EmbeddingBag(VOCAB, DIM, mode="mean"), "bag"))
        inputs = (torch.randint(0, VOCAB, (9, 6), generator=g).to(DEVICE),)
        rows = 9
    else:
        layer = _with_adapters(LoraEmbedding(nn.Embedding(VOCAB, DIM), "emb"))
        inputs = (torch.randint(0, VOCAB, (9, 3), generator=g).to(DEVICE),)
        rows = 9 * 3
    calls = []
    op_name = "segmented_lora_linear" if kind == "linear" else "segmented_lora_bag_delta"
    real = getattr(seg, op_name)
    monkeypatch.setattr(seg, op_name, lambda *a: calls.append(1) or real(*a))
    torch_out, torch_grads = _routed_run(layer, inputs, ids, "torch", monkeypatch)
    assert not calls
    triton_out, triton_grads = _routed_run(layer, inputs, ids, "triton", monkeypatch)
    assert calls == [1]
    # Both paths compute the same exact values in float32 (computed=2): the outputs are sums of
    # ≤ 13 + 5 + 4 terms (linear) or 6 + 5 + 2 (bags); the gradients of Σ y² double the chain and
    # add the sum over ≤ 36 rows.
    n = 2 * (13 + 5 + 4 + 2) + rows + 2
    assert_within_bound(triton_out, torch_out, _abs_routed(layer, inputs, ids)[0], n, name="out")
    assert set(triton_grads) == set(torch_grads)
    bounds = _abs_routed(layer, inputs, ids)[1]
    for name, grad in torch_grads.items():
        assert_within_bound(triton_grads[name], grad, bounds[name], n, name=name)


def _abs_routed(layer, inputs, ids):
    """The layer on absolute values in float64 (reference_math.abs_twin, scales made positive):
    the bound's Σ|terms| of the output and of the gradients of Σ out²."""
    twin = abs_twin(layer.cpu())
    layer.to(DEVICE)
    twin.scaling = {k: abs(v) for k, v in twin.scaling.items()}
    with routed(ids, ROUTED_NAMES):
        out = twin(*(t.cpu() for t in abs_inputs(*inputs)))
    out.pow(2).sum().backward()
    return out.detach(), {n: dense_grad(p.grad) for n, p in twin.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------------------------------------
# The reference list forms with many adapters in the batch: each row gathers its own (BGMV)
# ---------------------------------------------------------------------------------------------

MANY = reference.GATHER_MIN_ADAPTERS + 4
LINEAR_CASES["many adapters, unequal ranks"] = (60, 14, 11, tuple(1 + a % 5 for a in range(MANY)), ids_random, True)


def layout_many_bags(g):
    """64 weighted bags of 0 to 6 ids: enough bags for every adapter to have some."""
    lengths = torch.randint(0, 7, (64,), generator=g)
    offsets = torch.cumsum(lengths, 0) - lengths
    ids = torch.randint(0, VOCAB, (int(lengths.sum()),), generator=g)
    return bag_layout(ids, offsets, num_embeddings=VOCAB, per_sample_weights=torch.rand(ids.numel(), generator=g))


BAG_CASES["many adapters, unequal ranks"] = (layout_many_bags, tuple(1 + a % 4 for a in range(MANY)), ids_random)


def _spy(monkeypatch, name):
    calls = []
    real = getattr(reference, name)
    monkeypatch.setattr(reference, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def test_the_reference_linear_list_form_gathers_with_many_adapters(monkeypatch):
    """≥ GATHER_MIN_ADAPTERS adapters in a small batch: the list form gathers each row's factors
    (one adapter the layer lacks among them) and still gives each adapter its own gradient."""
    calls = _spy(monkeypatch, "_gathered_linear")
    case = linear_case("many adapters, unequal ranks", torch.float32, seed=5)
    case["ids"] = case["ids"].cpu()
    expected, bound = linear_expectation(case)
    x = case["x"].cpu().clone().requires_grad_(True)
    leaves = [
        (A.cpu().clone().requires_grad_(True), B.cpu().clone().requires_grad_(True))
        for A, B in zip(case["As"], case["Bs"])
    ]
    adapters = [AdapterWeights(A, B, s) for (A, B), s in zip(leaves, case["scales"])]
    adapters[3] = None
    expected["As"][3], expected["Bs"][3] = torch.zeros_like(expected["As"][3]), torch.zeros_like(expected["Bs"][3])
    keep = (case["ids"] != 3).unsqueeze(1)
    expected["y"] = torch.where(
        keep,
        expected["y"],
        loop_linear(
            case["x"].double().cpu(),
            case["weight"].double().cpu(),
            case["bias"].double().cpu(),
            [],
            [],
            [],
            case["ids"],
        ),
    )
    y = reference.segmented_lora_linear(x, case["weight"].cpu(), case["bias"].cpu(), adapters, case["ids"])
    y.backward(case["grad_y"].cpu())
    assert calls, "the gathering branch did not run"
    got = {"y": y, "x": x.grad, "As": [A.grad for A, _ in leaves], "Bs": [B.grad for _, B in leaves]}
    check("y", got["y"], expected["y"], bound["y"], roundings(torch.float32, 60, 14, 11, 5), torch.float32)
    check_adapter_grads(got, expected, bound, roundings(torch.float32, 60, 14, 11, 5), torch.float32)


def test_the_reference_bag_list_form_gathers_with_many_adapters_when_no_gradient_is_wanted(monkeypatch):
    """Serving (no gradient): each bag pools from its own adapter's stacked table; training: the
    loop, each table its own sparse gradient. Both give the loop's values."""
    calls = _spy(monkeypatch, "_gathered_bag_delta")
    case = bag_case("many adapters, unequal ranks", torch.float32, seed=6)
    expected, bound = bag_expectation(case)
    tables = [A.clone().requires_grad_(True) for A in case["As"]]
    adapters = [AdapterWeights(A, B, s) for A, B, s in zip(tables, case["Bs"], case["scales"])]
    longest = int(torch.bincount(case["layout"].bag_of_id, minlength=1).max())
    n = roundings(torch.float32, longest, 4, DIM, case["layout"].num_bags)
    delta = lambda: reference.segmented_lora_bag_delta(case["layout"], adapters, case["ids"], DIM, torch.float32)  # noqa: E731
    with torch.no_grad():
        served = case["base"] + delta()
    assert len(calls) == 1, "the gathering branch did not run"
    check("served", served, expected["out"], bound["out"], n, torch.float32)
    trained = case["base"] + delta()
    assert len(calls) == 1, "training gathered"
    check("trained", trained, expected["out"], bound["out"], n, torch.float32)
    trained.backward(case["grad"])
    assert all(t.grad is None or t.grad.is_sparse for t in tables)


def test_served_stacks_follow_in_place_updates_and_new_scales(monkeypatch):
    """Without autograd the gathered branch reuses its stacks while nothing changed; an in-place
    update of a factor, a new scale or a new adapter must show in the very next call (checked
    against the loop, which stacks nothing)."""
    layer = LoraLinear(nn.Linear(10, 6), "fc")
    for a in range(MANY):
        layer.update_layer(f"a{a}", r=2 + a % 3, scale=1.0 + a, dropout=0.0, init=False)
    names = tuple(f"a{a}" for a in range(MANY))
    g = torch.Generator().manual_seed(3)
    x, ids = torch.randn(40, 10, generator=g), torch.randint(-1, MANY, (40,), generator=g)
    layer.eval()

    def both():
        """(served, looped, bound): two float32 runs of one exact value, and Σ|terms|."""
        with torch.no_grad(), routed(ids, names):
            served = layer(x)
            monkeypatch.setattr(reference, "GATHER_MIN_ADAPTERS", 10**9)
            looped = layer(x)
            monkeypatch.undo()
            twin = abs_twin(layer)
            twin.scaling = {k: abs(v) for k, v in twin.scaling.items()}
            bound = twin(x.abs().double())
        return served, looped, bound

    n = 10 + 4 + 4  # x·Wᵀ (10), u (10), ·B (r ≤ 4), + base and scale
    calls = _spy(monkeypatch, "_gathered_linear")
    first, looped, bound = both()
    assert calls, "the gathering branch did not run"
    assert_within_bound(first, looped, bound, n, name="served")
    with torch.no_grad():
        layer.lora_B["a1"].add_(1.0)  # in place: the stack must be rebuilt
    second, looped, bound = both()
    assert not torch.equal(second, first)
    assert_within_bound(second, looped, bound, n, name="after an in-place update")
    layer.scaling = {**layer.scaling, "a2": -3.0}  # a new scale
    third, looped, bound = both()
    assert not torch.equal(third, second)
    assert_within_bound(third, looped, bound, n, name="after a new scale")


def test_inside_the_unchanged_factors_promise_stacks_are_reused_until_the_adapters_change(monkeypatch):
    """Inside ``unchanged_factors`` a served layer builds its stacks once (no version reads: an
    in-place update is then not seen, as promised away); a new adapter (a new routed list) is
    still stacked afresh, and outside the promise the in-place update shows again."""
    layer = LoraLinear(nn.Linear(10, 6), "fc")
    for a in range(MANY):
        layer.update_layer(f"a{a}", r=2 + a % 3, scale=1.0 + a, dropout=0.0, init=False)
    g = torch.Generator().manual_seed(4)
    x, ids = torch.randn(40, 10, generator=g), torch.randint(-1, MANY, (40,), generator=g)
    layer.eval()
    builds = _spy(monkeypatch, "padded_stack")

    def served(names):
        with torch.no_grad(), routed(ids, names), reference.unchanged_factors():
            return layer(x)

    names = tuple(f"a{a}" for a in range(MANY))
    first = served(names)
    assert len(builds) == 2  # A's stack and B's
    with torch.no_grad():
        layer.lora_B["a1"].add_(1.0)
    assert torch.equal(served(names), first) and len(builds) == 2  # promised unchanged: reused
    layer.update_layer("extra", r=3, scale=2.0, dropout=0.0, init=False)
    served((*names, "extra"))
    assert len(builds) == 4  # a new routed list: new stacks
    with torch.no_grad(), routed(ids, names):
        outside = layer(x)  # versions read again: the update shows
    assert not torch.equal(outside, first) and len(builds) == 6


def test_under_one_promised_generation_a_layer_keeps_its_routed_list_until_the_generation_changes():
    """``unchanged_factors(generation)`` promises the layer's adapters too: under the same
    generation its routed list is reused without being compared (a new scale set behind the
    promise is not seen), a new generation compares and rebuilds it, and outside any promise the
    comparison always runs."""
    layer = LoraLinear(nn.Linear(10, 6), "fc")
    for a in range(MANY):
        layer.update_layer(f"a{a}", r=2 + a % 3, scale=1.0 + a, dropout=0.0, init=False)
    g = torch.Generator().manual_seed(5)
    x, ids = torch.randn(40, 10, generator=g), torch.randint(-1, MANY, (40,), generator=g)
    ids[:4] = 1  # the adapter whose scale changes serves some rows
    names = tuple(f"a{a}" for a in range(MANY))
    layer.eval()

    def served(generation):
        with torch.no_grad(), routed(ids, names), reference.unchanged_factors(generation):
            return layer(x), layer.routed_adapters(Routing(ids, names))

    first, kept = served("g0")
    layer.scaling = {**layer.scaling, "a1": -3.0}  # behind the promise
    again, same = served("g0")
    assert same is kept and torch.equal(again, first)
    changed, rebuilt = served("g1")  # a new generation: compared, rebuilt
    assert rebuilt is not kept and not torch.equal(changed, first)
    assert rebuilt[1].scale == -3.0
    layer.scaling = {**layer.scaling, "a1": 2.0}
    _, outside = served(None)  # no generation: compared on every call
    assert outside is not rebuilt and outside[1].scale == 2.0


def test_a_routed_list_changed_in_place_is_read_afresh():
    """Only a layer's immutable RoutedAdapters keeps its facts and stacks (reference.list_facts);
    a caller that puts another adapter, or None, into the same plain list object gets that
    list's numbers, in the gathering branch (its stacks too) and in the loop."""
    case = linear_case("many adapters, unequal ranks", torch.float32, seed=12)
    adapters = [AdapterWeights(A.cpu(), B.cpu(), s) for A, B, s in zip(case["As"], case["Bs"], case["scales"])]
    x, weight, bias, ids = (case[k].cpu() for k in ("x", "weight", "bias", "ids"))
    for gather in (True, False):
        limit = reference.GATHER_MIN_ADAPTERS if gather else 10**9
        with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
            patch.setattr(reference, "GATHER_MIN_ADAPTERS", limit)
            first = reference.segmented_lora_linear(x, weight, bias, adapters, ids)
            kept = adapters[2]
            adapters[2] = None  # rows of adapter 2: the base alone now
            second = reference.segmented_lora_linear(x, weight, bias, adapters, ids)
            fresh = reference.segmented_lora_linear(x, weight, bias, list(adapters), ids)
            adapters[2] = kept
        rows = ids == 2
        assert rows.any() and not torch.equal(first[rows], second[rows]), "adapter 2 still served"
        assert torch.equal(second, fresh)


# ---------------------------------------------------------------------------------------------
# The CPU path's loop over rows grouped once (recpeft.kernels.grouped): random order and rows
# already grouped by adapter (spans of x itself), a routed name the layer lacks, dropout
# ---------------------------------------------------------------------------------------------

ORDERS = ["random order", "grouped by adapter"]


def _cpu_leaves(case):
    """(A, B) per adapter, CPU copies that collect gradients."""
    return [
        (A.cpu().clone().requires_grad_(True), B.cpu().clone().requires_grad_(True))
        for A, B in zip(case["As"], case["Bs"])
    ]


def _ordered(case, order):
    if order == "grouped by adapter":
        case["ids"] = case["ids"].sort().values
    return case


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", ["random with -1", "empty groups", "unequal ranks past 16"])
def test_grouped_linear_matches_the_per_adapter_loop(name, order):
    case = _ordered(linear_case(name, torch.float32, seed=7), order)
    missing = len(case["As"]) - 1  # routed, but the layer has no such adapter: its rows get the base
    case["As"][missing], case["Bs"][missing] = case["As"][missing] * 0, case["Bs"][missing] * 0
    expected, bound = linear_expectation(case)
    x = case["x"].cpu().clone().requires_grad_(True)
    leaves = _cpu_leaves(case)
    adapters = [AdapterWeights(A, B, s) for (A, B), s in zip(leaves, case["scales"])]
    adapters[missing] = None
    y = grouped.grouped_lora_linear(x, case["weight"].cpu(), case["bias"], adapters, case["ids"].cpu())
    y.backward(case["grad_y"].cpu())
    got = {"y": y, "x": x.grad, "As": [A.grad for A, _ in leaves], "Bs": [B.grad for _, B in leaves]}
    assert got["As"][missing] is None and got["Bs"][missing] is None
    check_linear(case, got, expected, bound)


@pytest.mark.parametrize("order", ORDERS)
def test_grouped_linear_dropout_uses_each_adapters_p_and_one_mask_for_forward_and_backward(order, monkeypatch):
    """The masks drawn per span (recorded here) are those forward, dX and dA all use."""
    case = _ordered(linear_case("random with -1", torch.float32, seed=8), order)
    p = [0.3, 0.0, 0.5, 0.2]
    drawn = []
    real = grouped.dropout_keep_mask
    monkeypatch.setattr(grouped, "dropout_keep_mask", lambda t, q: drawn.append(real(t, q)) or drawn[-1])
    x = case["x"].cpu().clone().requires_grad_(True)
    leaves = _cpu_leaves(case)
    adapters = [AdapterWeights(A, B, s, q) for (A, B), s, q in zip(leaves, case["scales"], p)]
    ids = case["ids"].cpu()
    y = grouped.grouped_lora_linear(x, case["weight"].cpu(), case["bias"], adapters, ids)
    y.backward(case["grad_y"].cpu())
    keep = torch.ones_like(x, dtype=torch.float32)
    dropping = [a for a in range(len(p)) if p[a] > 0 and (ids == a).any()]
    assert len(drawn) == len(dropping), "one mask per dropping adapter with rows"
    for a, mask in zip(dropping, drawn):
        keep[(ids == a).nonzero().squeeze(1)] = mask
    assert (keep == 0).any(), "nothing dropped: the check would not see the mask"
    expected, bound = linear_expectation(case, keep)
    got = {"y": y, "x": x.grad, "As": [A.grad for A, _ in leaves], "Bs": [B.grad for _, B in leaves]}
    check_linear(case, got, expected, bound)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("name", ["weighted sums, -1 and empty bags", "mean with padding", "plain lookup"])
def test_grouped_bag_matches_the_per_adapter_loop(name, order):
    """Each table gets a sparse gradient of its own rows; a routed name the layer lacks, none."""
    case = _ordered(bag_case(name, torch.float32, seed=9), order)
    missing = len(case["As"]) - 1
    case["As"][missing], case["Bs"][missing] = case["As"][missing] * 0, case["Bs"][missing] * 0
    expected, bound = bag_expectation(case)
    layout = case["layout"]
    cpu = dataclasses.replace(layout, **{f: getattr(layout, f).cpu() for f in ("ids", "bag_of_id", "offsets")})
    cpu = dataclasses.replace(cpu, weights=None if layout.weights is None else layout.weights.cpu())
    tables = [A.cpu().clone().requires_grad_(True) for A in case["As"]]
    Bs = [B.cpu().clone().requires_grad_(True) for B in case["Bs"]]
    adapters = [AdapterWeights(A, B, s) for A, B, s in zip(tables, Bs, case["scales"])]
    adapters[missing] = None
    out = case["base"].cpu() + grouped.grouped_bag_delta(cpu, adapters, case["ids"].cpu(), DIM, torch.float32)
    out.backward(case["grad"].cpu())
    assert tables[missing].grad is None and Bs[missing].grad is None
    assert all(t.grad is None or t.grad.is_sparse for t in tables)
    got = {"out": out, "base": case["grad"], "As": [t.grad for t in tables], "Bs": [B.grad for B in Bs]}
    check_bag(case, got, expected, bound)
