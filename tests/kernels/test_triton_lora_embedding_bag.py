"""The fused Triton LoRA embedding bag (kernels/lora_embedding_bag.py) against the float64
reference: every input form, hypothesis-drawn shapes and bag lengths (zero included), output and
both gradients, outputs poisoned with NaN before each run, fp32/bf16/fp16 tables, int32 and int64
ids. The gradient of A must equal the reference op's bit for bit (same dtype) and cover exactly
the looked-up rows. Runs under TRITON_INTERPRET=1 on CPU (tests/conftest.py) and on CUDA when a
GPU is present.
"""

import importlib
import sys

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st
from torch import nn

from recpeft.kernels import BagLayout, bag_layout, dispatch, reference, unpooled_layout
from recpeft.kernels.launch import DOT_MIN, INTERPRETING
from recpeft.layers import LoraEmbedding, LoraEmbeddingBag

from reference_math import UNIT_ROUNDOFF, abs_twin, gamma, leaf64, naive_bag

# The Triton module, found the way dispatch finds it.
fused = sys.modules[dispatch.triton_op("lora_embedding_bag").__module__]

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(
            not INTERPRETING,
            reason="Triton runs CPU tensors only under TRITON_INTERPRET=1 (conftest sets it without CUDA)",
        ),
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(
            not torch.cuda.is_available(), reason="no CUDA GPU on this machine: the CUDA runs of these tests need one"
        ),
    ),
]
NAN = float("nan")

# Error bound (reference_math.assert_within_bound): every output and gradient here is a float32
# sum of products of exact inputs, so |computed − exact| ≤ γ_n·Σ|terms|, Σ|terms| being the same
# op on absolute values (_abs_bound). n counts the roundings along the longest chain, generously:
# a bag of ≤ 8 ids (+1 for mean), the rank-space product of r ≤ 20, the scale, the base (forward);
# dY·Bᵀ over D ≤ 40 and the weight (A rows); Σ over ≤ 40 bags of pooledᵀ·dY (B). A 16-bit result
# is that float32 value converted to its dtype at most twice (the per-bag gradient, then the
# result), each conversion within 2·u (the interpreter truncates where the GPU rounds): + 4·u.
ROUNDINGS = 128


def _abs_layout(layout: BagLayout) -> BagLayout:
    weights = layout.weights.double().abs() if layout.weights is not None else None
    return BagLayout(layout.ids, layout.bag_of_id, layout.offsets, weights, layout.num_bags)


def _abs_bound(table, layout, lora_A, lora_B, scale, base_output=None, dy=None):
    """Σ|terms| of the output [bags, D] and, with ``dy``, of dA's rows [ids, r] and dB [r, D]:
    the float64 reference op on absolute values."""
    A, B = leaf64(lora_A.abs()), leaf64(lora_B.abs())
    base = base_output.double().abs() if base_output is not None else None
    out = reference.lora_embedding_bag(table.double().abs(), _abs_layout(layout), A, B, abs(scale), base)
    if dy is None:
        return out.detach()
    out.backward(dy.double().abs())
    rows = A.grad._values() if A.grad is not None else torch.zeros(0, A.shape[1], dtype=torch.float64)
    return out.detach(), rows, B.grad if B.grad is not None else torch.zeros_like(B)


def assert_bag_close(got, expected, bound, dtype=torch.float32, computed=1, name="value"):
    """|got − expected| ≤ computed·(γ_ROUNDINGS + 4·u(dtype))·bound, element by element (u = 0
    for float32); ``computed`` as in reference_math.assert_within_bound."""
    got, expected, bound = (t.detach().cpu().double() for t in (got, expected, bound))
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    extra = 0.0 if dtype == torch.float32 else 4 * UNIT_ROUNDOFF[dtype]
    limit = computed * (gamma(ROUNDINGS) + extra) * bound
    bad = ~((got - expected).abs() <= limit)  # NaN fails
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.numel()} elements out of bound; worst |diff| "
        f"{float((got - expected).abs()[bad].max())} against limit {float(limit[bad].min())}"
    )


# (table dtype, adapter dtype): the three table dtypes with matching adapters, and a bf16 table
# with an fp32 adapter (the GPU benchmark's configuration; output promotes to fp32).
DTYPE_CASES = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
]
DTYPE_IDS = ["fp32", "bf16", "fp16", "bf16_table_fp32_adapter"]


# ---------------------------------------------------------------------------------------------
# Building cases
# ---------------------------------------------------------------------------------------------


def _module_inputs(form, lengths, num_embeddings, id_dtype, weighted, padding_idx, g):
    """Python bags (for the naive formula) and the nn.EmbeddingBag arguments of one input form."""
    if form == "2d":
        width = lengths[0] if lengths else 0
        lengths = [width] * len(lengths)
    bags = [torch.randint(0, num_embeddings, (n,), generator=g).tolist() for n in lengths]
    if padding_idx is not None:  # make sure the padding id occurs
        for bag in bags:
            if bag:
                bag[0] = padding_idx
                break
    flat = torch.tensor([i for bag in bags for i in bag], dtype=id_dtype)
    weights = [torch.rand(n, generator=g).tolist() for n in lengths] if weighted else None
    psw = torch.tensor([w for ws in weights for w in ws]) if weighted else None
    starts = torch.tensor([0] + lengths[:-1], dtype=torch.int64).cumsum(0).to(id_dtype)
    if form == "2d":
        shape = (len(lengths), lengths[0] if lengths else 0)
        return bags, weights, (flat.view(shape), None, psw.view(shape) if weighted else None)
    if form == "include_last_offset":
        return bags, weights, (flat, torch.cat([starts, starts.new_tensor([flat.numel()])]), psw)
    return bags, weights, (flat, starts, psw)


def _layout(form, args, num_embeddings, mode, padding_idx, table_dtype):
    if form == "unpooled":
        return unpooled_layout(args[0], padding_idx)
    ids, offsets, psw = args
    return bag_layout(
        ids,
        offsets,
        num_embeddings=num_embeddings,
        mode=mode,
        per_sample_weights=psw,
        include_last_offset=form == "include_last_offset",
        padding_idx=padding_idx,
        weight_dtype=table_dtype,
    )


def _on(layout: BagLayout, device) -> BagLayout:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return BagLayout(
        move(layout.ids), move(layout.bag_of_id), move(layout.offsets), move(layout.weights), layout.num_bags
    )


def _as_float64(layout: BagLayout) -> BagLayout:
    weights = layout.weights.double() if layout.weights is not None else None
    return BagLayout(layout.ids, layout.bag_of_id, layout.offsets, weights, layout.num_bags)


def _parameters(num_embeddings, dim, rank, table_dtype, adapter_dtype, device, g):
    """E, A, B drawn in float64 and rounded to their dtypes (A nonzero, so the delta matters)."""
    table = torch.randn(num_embeddings, dim, generator=g, dtype=torch.float64).to(device, table_dtype)
    lora_A = torch.randn(num_embeddings, rank, generator=g, dtype=torch.float64).to(device, adapter_dtype)
    lora_B = torch.randn(rank, dim, generator=g, dtype=torch.float64).to(device, adapter_dtype)
    return table, lora_A, lora_B


# ---------------------------------------------------------------------------------------------
# The check every case goes through
# ---------------------------------------------------------------------------------------------


def check_fused_op(table, layout, lora_A, lora_B, scale, *, base_output=None, deterministic=True, g=None):
    """Launchers with NaN-poisoned outputs against the float64 reference; then the autograd
    entry against the reference op in the same dtype, the A-gradient bit for bit."""
    device, (num_bags, dim), rank = table.device, (layout.num_bags, table.shape[1]), lora_A.shape[1]
    out_dtype = torch.promote_types(table.dtype if base_output is None else base_output.dtype, lora_A.dtype)
    dy = torch.randn(num_bags, dim, generator=g, dtype=torch.float64).to(device, out_dtype)

    # float64 oracle: same values, upcast
    A64, B64 = leaf64(lora_A), leaf64(lora_B)
    base64 = base_output.double() if base_output is not None else None
    expected = reference.lora_embedding_bag(table.double(), _as_float64(layout), A64, B64, scale, base64)
    expected.backward(dy.double())
    # one row per looked-up id, in layout order: w_i·s·dY_{bag(i)}·Bᵀ
    expected_rows = A64.grad._values() if A64.grad is not None else torch.zeros(0, rank, dtype=torch.float64)
    expected_dB = B64.grad if B64.grad is not None else torch.zeros_like(B64)

    # launchers, every output poisoned first
    out = torch.full((num_bags, dim), NAN, dtype=out_dtype, device=device)
    pooled = torch.full((num_bags, rank), NAN, dtype=torch.float32, device=device)
    fused.lora_embedding_bag_forward(
        table, lora_A, lora_B, layout.ids, layout.offsets, layout.weights, scale, base_output, out=out, pooled=pooled
    )
    bound, bound_rows, bound_dB = _abs_bound(table, layout, lora_A, lora_B, scale, base_output, dy)
    assert_bag_close(out, expected, bound, out_dtype, name="out")
    without_adapter = reference.lora_embedding_bag(
        table.double(), _as_float64(layout), A64.detach(), torch.zeros_like(B64), scale, base64
    )
    if bool((without_adapter != expected).any()):  # the bound can fail: the base alone is outside it
        with pytest.raises(AssertionError, match="out of bound"):
            assert_bag_close(without_adapter, expected, bound, out_dtype)
    expected_pooled = reference.pooled_rank_space(A64.detach(), layout.ids, layout.offsets, _as_float64(layout).weights)
    bound_pooled = reference.pooled_rank_space(
        A64.detach().abs(), layout.ids, layout.offsets, _abs_layout(layout).weights
    )
    assert_bag_close(pooled, expected_pooled, bound_pooled, name="pooled")

    values = torch.full((layout.ids.numel(), rank), NAN, dtype=lora_B.dtype, device=device)
    grad_b = torch.full((rank, dim), NAN, dtype=lora_B.dtype, device=device)
    fused.lora_embedding_bag_backward(
        dy,
        pooled,
        lora_B,
        layout.bag_of_id,
        layout.weights,
        scale,
        deterministic=deterministic,
        grad_a_values=values,
        grad_b=grad_b,
    )
    # Row by row (summing duplicate ids would add cancellation to the comparison, not the kernel)
    assert_bag_close(values, expected_rows, bound_rows, lora_B.dtype, name="dA rows")
    grad_a = torch.sparse_coo_tensor(layout.ids.unsqueeze(0), values, lora_A.shape, check_invariants=True)
    used = sorted(set(layout.ids.tolist()))
    assert grad_a.coalesce().indices()[0].tolist() == used  # the used rows, no others
    assert_bag_close(grad_b, expected_dB, bound_dB, lora_B.dtype, name="dB")

    # the autograd entry: same forward bits, sparse dA equal to the reference op's
    A_f, B_f = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
    out_f = fused.lora_embedding_bag(table, layout, A_f, B_f, scale, base_output, deterministic=deterministic)
    assert torch.equal(out_f, out)
    out_f.backward(dy)
    assert A_f.grad.is_sparse and table.grad is None
    assert torch.equal(B_f.grad, grad_b)
    reference_runs = layout.weights is None or layout.weights.dtype == lora_A.dtype  # F.embedding_bag
    if reference_runs:  # refuses weights whose dtype differs from the table it pools (here A)
        A_r, B_r = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
        reference.lora_embedding_bag(table, layout, A_r, B_r, scale, base_output).backward(dy)
        assert torch.equal(A_f.grad._indices(), A_r.grad._indices())
        assert torch.equal(A_f.grad._values(), A_r.grad._values())
        assert torch.equal(A_f.grad.coalesce().values(), A_r.grad.coalesce().values())
    return out


# ---------------------------------------------------------------------------------------------
# Hypothesis: shapes, forms, dtypes, bag lengths
# ---------------------------------------------------------------------------------------------

NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
cases = st.fixed_dictionaries(
    {
        "num_embeddings": st.integers(1, 50),
        "dim": st.integers(1, 40),
        "rank": st.integers(1, 20),
        # at least one id (no bags and only empty bags have their own test); empty bags anywhere
        "lengths": st.lists(st.integers(0, 6), min_size=1, max_size=8).filter(any),
        "form": st.sampled_from(["offsets", "include_last_offset", "2d", "unpooled"]),
        "mode": st.sampled_from(["sum", "mean"]),
        "weighted": st.booleans(),
        "padding": st.booleans(),
        "id_dtype": st.sampled_from([torch.int64, torch.int32]),
        "with_base": st.booleans(),
        "deterministic": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table_dtype,adapter_dtype", DTYPE_CASES, ids=DTYPE_IDS)
@settings(max_examples=20, phases=NO_SHRINK)  # the interpreter makes shrinking take minutes
@given(case=cases)
def test_fused_op_matches_float64_reference(device, table_dtype, adapter_dtype, case):
    g = torch.Generator().manual_seed(case["seed"])
    V, form = case["num_embeddings"], case["form"]
    padding_idx = int(torch.randint(0, V, (1,), generator=g)) if case["padding"] else None
    weighted = case["weighted"] and case["mode"] == "sum" and form != "unpooled"
    _, _, args = _module_inputs(form, case["lengths"], V, case["id_dtype"], weighted, padding_idx, g)
    layout = _on(_layout(form, args, V, case["mode"], padding_idx, table_dtype), device)
    table, lora_A, lora_B = _parameters(V, case["dim"], case["rank"], table_dtype, adapter_dtype, device, g)
    base = None
    if case["with_base"]:
        base = torch.randn(layout.num_bags, case["dim"], generator=g, dtype=torch.float64).to(device, table_dtype)
    check_fused_op(table, layout, lora_A, lora_B, 1.5, base_output=base, deterministic=case["deterministic"], g=g)


# ---------------------------------------------------------------------------------------------
# Every input form once, by name, against the naive per-bag formula
# ---------------------------------------------------------------------------------------------

V, D, R = 23, 20, 5
FORMS = {
    "offsets": dict(form="offsets", mode="sum"),
    "include_last_offset": dict(form="include_last_offset", mode="sum"),
    "2d_fixed_length": dict(form="2d", mode="sum"),
    "per_sample_weights": dict(form="offsets", mode="sum", weighted=True),
    "padding_idx": dict(form="offsets", mode="sum", padding_idx=4),
    "mean": dict(form="offsets", mode="mean"),
    "mean_padding_idx": dict(form="include_last_offset", mode="mean", padding_idx=0),
}
LENGTHS = [3, 0, 5, 1, 0, 7, 2]  # empty bags inside and no bag longer than one gather step


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("name", list(FORMS))
def test_every_input_form_matches_naive_formula(device, id_dtype, name):
    spec = FORMS[name]
    g = torch.Generator().manual_seed(7)
    padding_idx, weighted = spec.get("padding_idx"), spec.get("weighted", False)
    lengths = [4] * 5 if spec["form"] == "2d" else LENGTHS
    bags, weights, args = _module_inputs(spec["form"], lengths, V, id_dtype, weighted, padding_idx, g)
    layout = _on(_layout(spec["form"], args, V, spec["mode"], padding_idx, torch.float32), device)
    table, lora_A, lora_B = _parameters(V, D, R, torch.float32, torch.float32, device, g)
    out = check_fused_op(table, layout, lora_A, lora_B, 0.75, g=g)
    naive = naive_bag(
        bags,
        table.cpu().double(),
        lora_A.cpu().double(),
        lora_B.cpu().double(),
        0.75,
        spec["mode"],
        weights,
        padding_idx,
    )
    assert_bag_close(out, naive, _abs_bound(table, layout, lora_A, lora_B, 0.75), name="against the naive bags")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("padding_idx", [None, 3])
def test_unpooled_layout_of_nn_embedding(device, padding_idx):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, V, (4, 6), generator=g)
    if padding_idx is not None:
        ids[0, 0] = ids[2, 5] = padding_idx
    layout = _on(unpooled_layout(ids, padding_idx), device)
    table, lora_A, lora_B = _parameters(V, D, R, torch.float32, torch.float32, device, g)
    out = check_fused_op(table, layout, lora_A, lora_B, 2.0, g=g)
    flat = ids.reshape(-1).tolist()
    expected = naive_bag(
        [[i] for i in flat],
        table.cpu().double(),
        lora_A.cpu().double(),
        lora_B.cpu().double(),
        2.0,
        padding_idx=padding_idx,
    )
    assert_bag_close(out, expected, _abs_bound(table, layout, lora_A, lora_B, 2.0), name="against nn.Embedding")
    if padding_idx is not None:  # a padding id is an empty bag: zero, not E[padding_idx]
        assert torch.count_nonzero(out.view(4, 6, D)[0, 0]) == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("table_dtype,adapter_dtype", DTYPE_CASES, ids=DTYPE_IDS)
def test_dtypes_long_bags_and_wide_rows(device, table_dtype, adapter_dtype):
    """Bags longer than one gather step and D wider than one D-tile (two tiles, the second
    partial), mean pooling with padding: the loops and masks a short case does not reach."""
    g = torch.Generator().manual_seed(11)
    num_embeddings, dim, rank = 300, fused.MAX_BLOCK_D + 24, 3
    lengths = [0, 70, 33, 1, 0, 64]
    _, _, args = _module_inputs("offsets", lengths, num_embeddings, torch.int64, False, 7, g)
    layout = _on(_layout("offsets", args, num_embeddings, "mean", 7, table_dtype), device)
    assert fused.launch_settings(dim, rank, layout.ids.numel(), layout.num_bags).d_tiles == 2
    table, lora_A, lora_B = _parameters(num_embeddings, dim, rank, table_dtype, adapter_dtype, device, g)
    check_fused_op(table, layout, lora_A, lora_B, 0.5, g=g)


@pytest.mark.parametrize("device", DEVICES)
def test_int32_layout_gives_the_int64_result(device):
    """The kernels read int32 ids, bag indices and offsets as they are (no int64 copy)."""
    g = torch.Generator().manual_seed(5)
    _, _, args = _module_inputs("offsets", LENGTHS, V, torch.int64, True, None, g)
    wide = _on(_layout("offsets", args, V, "sum", None, torch.float32), device)
    narrow = BagLayout(wide.ids.int(), wide.bag_of_id.int(), wide.offsets.int(), wide.weights, wide.num_bags)
    table, lora_A, lora_B = _parameters(V, D, R, torch.float32, torch.float32, device, g)
    out64 = check_fused_op(table, wide, lora_A, lora_B, 1.0, g=g)
    out32 = check_fused_op(table, narrow, lora_A, lora_B, 1.0, g=g)
    assert torch.equal(out32, out64)


@pytest.mark.parametrize("device", DEVICES)
def test_no_bags_and_only_empty_bags(device):
    table, lora_A, lora_B = _parameters(V, D, R, torch.float32, torch.float32, device, torch.Generator().manual_seed(0))
    no_ids = torch.zeros(0, dtype=torch.int64)
    none = _on(bag_layout(no_ids, torch.zeros(0, dtype=torch.int64), num_embeddings=V), device)
    assert check_fused_op(table, none, lora_A, lora_B, 1.0).shape == (0, D)
    empty = _on(bag_layout(no_ids, torch.zeros(3, dtype=torch.int64), num_embeddings=V), device)
    A_f, B_f = lora_A.clone().requires_grad_(), lora_B.clone().requires_grad_()
    out = fused.lora_embedding_bag(table, empty, A_f, B_f, 1.0)
    assert torch.equal(out, torch.zeros(3, D, device=device))
    out.backward(torch.randn(3, D, device=device))
    assert A_f.grad.is_sparse and A_f.grad._nnz() == 0
    assert torch.equal(B_f.grad, torch.zeros_like(lora_B))


# ---------------------------------------------------------------------------------------------
# The dB reduction: deterministic and atomic
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_base", [False, True])
def test_forward_programs_pooling_runs_of_bags(device, with_base, monkeypatch):
    """Large batches give each forward program a run of bags (B loaded once per run); here on a
    small batch, with a partial last run and empty bags inside runs."""
    monkeypatch.setattr(fused, "FORWARD_TARGET_PROGRAMS", 8)
    g = torch.Generator().manual_seed(13)
    lengths = torch.randint(0, 4, (43,), generator=g).tolist()
    lengths[9:12] = [0, 0, 0]
    cfg = fused.launch_settings(D, R, sum(lengths), len(lengths))
    assert cfg.bags_per_program == 5 and len(lengths) % cfg.bags_per_program != 0
    _, _, args = _module_inputs("offsets", lengths, V, torch.int64, True, None, g)
    layout = _on(_layout("offsets", args, V, "sum", None, torch.float32), device)
    table, lora_A, lora_B = _parameters(V, D, R, torch.float32, torch.float32, device, g)
    base = torch.randn(len(lengths), D, generator=g).to(device) if with_base else None
    check_fused_op(table, layout, lora_A, lora_B, 1.0, base_output=base, g=g)


@pytest.mark.parametrize("device", DEVICES)
def test_grad_b_deterministic_is_bitwise_repeatable_and_atomic_agrees(device, monkeypatch):
    monkeypatch.setattr(fused, "DB_TARGET_PROGRAMS", 4)  # several runs of bags on a small batch
    num_bags = 150
    per_run, runs = fused.grad_b_split(num_bags)
    assert runs == 4 and per_run % fused.BAGS_PER_DOT == 0 and per_run * runs >= num_bags > per_run * (runs - 1)
    g = torch.Generator().manual_seed(9)
    lengths = torch.randint(0, 4, (num_bags,), generator=g).tolist()
    _, _, args = _module_inputs("offsets", lengths, V, torch.int64, True, None, g)
    layout = _on(_layout("offsets", args, V, "sum", None, torch.float32), device)
    table, lora_A, lora_B = _parameters(V, D, R, torch.float32, torch.float32, device, g)
    out, pooled = fused.lora_embedding_bag_forward(
        table, lora_A, lora_B, layout.ids, layout.offsets, layout.weights, 1.25
    )
    dy = torch.randn(num_bags, D, generator=g).to(device)
    grads = {}
    for name, deterministic in (("det1", True), ("det2", True), ("atomic", False)):
        poisoned = torch.full((R, D), NAN, device=device)
        _, grads[name] = fused.lora_embedding_bag_backward(
            dy,
            pooled,
            lora_B,
            layout.bag_of_id,
            layout.weights,
            1.25,
            need_grad_a=False,
            deterministic=deterministic,
            grad_b=poisoned,
        )
    assert torch.equal(grads["det1"], grads["det2"])
    expected = 1.25 * pooled.double().t() @ dy.double()
    bound = 1.25 * pooled.double().abs().t() @ dy.double().abs()
    for name, grad in grads.items():
        assert_bag_close(grad, expected, bound, name=name)


def test_deterministic_switch_keyword_env_default(monkeypatch):
    monkeypatch.delenv(fused.DETERMINISTIC_ENV, raising=False)
    assert fused.resolve_deterministic(None) is fused.DETERMINISTIC_GRAD_B
    monkeypatch.setenv(fused.DETERMINISTIC_ENV, "0")
    assert fused.resolve_deterministic(None) is False
    assert fused.resolve_deterministic(True) is True  # the keyword wins
    monkeypatch.setenv(fused.DETERMINISTIC_ENV, "1")
    assert fused.resolve_deterministic(None) is True
    monkeypatch.setenv(fused.DETERMINISTIC_ENV, "yes")
    with pytest.raises(ValueError, match="RECPEFT_DETERMINISTIC must be 0 or 1"):
        fused.resolve_deterministic(None)


# ---------------------------------------------------------------------------------------------
# Entry-point semantics
# ---------------------------------------------------------------------------------------------


def _small_case(device, seed=0, weighted=True):
    g = torch.Generator().manual_seed(seed)
    _, _, args = _module_inputs("offsets", LENGTHS, V, torch.int64, weighted, None, g)
    layout = _on(_layout("offsets", args, V, "sum", None, torch.float32), device)
    return (layout, *_parameters(V, D, R, torch.float32, torch.float32, device, g))


@pytest.mark.parametrize("device", DEVICES)
def test_given_base_output_is_used_instead_of_the_table(device):
    layout, table, lora_A, lora_B = _small_case(device)
    base = torch.randn(layout.num_bags, D, device=device, requires_grad=True)
    poisoned_table = torch.full_like(table, NAN)  # never read when the base output is given
    A_f = lora_A.clone().requires_grad_()
    out = fused.lora_embedding_bag(poisoned_table, layout, A_f, lora_B, 1.5, base)
    expected = reference.lora_embedding_bag(table, layout, lora_A, lora_B, 1.5, base.detach())
    bound = _abs_bound(table, layout, lora_A, lora_B, 1.5, base.detach())
    assert_bag_close(out, expected, bound, computed=2, name="out")  # two float32 computations
    dy = torch.randn_like(out)
    out.backward(dy)
    assert torch.equal(base.grad, dy)  # d(base + delta)/d base is the identity


@pytest.mark.parametrize("device", DEVICES)
def test_a_table_that_requires_grad_gets_the_reference_gradient(device):
    layout, table, lora_A, lora_B = _small_case(device)
    E_f, E_r = table.clone().requires_grad_(), table.clone().requires_grad_()
    out = fused.lora_embedding_bag(E_f, layout, lora_A, lora_B, 1.0)
    ref = reference.lora_embedding_bag(E_r, layout, lora_A, lora_B, 1.0)
    dy = torch.randn_like(out)
    out.backward(dy)
    ref.backward(dy)
    assert_bag_close(out, ref, _abs_bound(table, layout, lora_A, lora_B, 1.0), computed=2, name="out")
    assert torch.equal(E_f.grad, E_r.grad)  # dE = the weighted scatter of dY: the same sums, one order


def test_float64_runs_the_reference_op():
    layout, table, lora_A, lora_B = _small_case("cpu")
    table, lora_A, lora_B = table.double(), lora_A.double(), lora_B.double()
    assert torch.equal(
        fused.lora_embedding_bag(table, _as_float64(layout), lora_A, lora_B, 1.0),
        reference.lora_embedding_bag(table, _as_float64(layout), lora_A, lora_B, 1.0),
    )


def test_mismatched_shapes_and_dtypes_are_refused():
    layout, table, lora_A, lora_B = _small_case("cpu")
    with pytest.raises(ValueError, match=r"lora_B must be \[r=5, D=20\]"):
        fused.lora_embedding_bag_forward(table, lora_A, lora_B.t(), layout.ids, layout.offsets, None, 1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        fused.lora_embedding_bag_forward(table, lora_A, lora_B.half(), layout.ids, layout.offsets, None, 1.0)
    with pytest.raises(TypeError, match="ids must be 1-D int32 or int64"):
        fused.lora_embedding_bag_forward(table, lora_A, lora_B, layout.ids.float(), layout.offsets, None, 1.0)


@pytest.mark.parametrize("rank", [1, 4, 16, 17, 64])
@pytest.mark.parametrize("dim", [1, 8, 20, 128, 1000])
def test_every_tl_dot_dimension_is_at_least_16(rank, dim):
    """The interpreter accepts tl.dot with a dimension under 16; the GPU compiler refuses it. The
    dB dot is [block_r, BAGS_PER_DOT]·[BAGS_PER_DOT, block_d]."""
    cfg = fused.launch_settings(dim, rank, num_ids=100, num_bags=10)
    assert min(cfg.block_r, cfg.block_d, fused.BAGS_PER_DOT) >= DOT_MIN == 16
    assert cfg.block_r >= rank and cfg.block_d * cfg.d_tiles >= dim
    assert all(x & (x - 1) == 0 for x in (cfg.block_r, cfg.block_d, cfg.block_l))


# ---------------------------------------------------------------------------------------------
# The layers use the fused op
# ---------------------------------------------------------------------------------------------


def _layer(cls, base, adapters=("one", "two")):
    layer = cls(base.requires_grad_(False), "tables.t0")
    for k, name in enumerate(adapters):
        layer.update_layer(name, r=R - k, scale=1.5, dropout=0.0, init=False)
    layer.active_adapters = list(adapters)
    return layer


def _run_layer(layer, args, dy):
    for p in layer.parameters():
        p.grad = None
    out = layer(*args)
    out.backward(dy)
    return out, {n: p.grad.to_dense() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
def test_layers_go_through_the_triton_op_under_recpeft_backend_triton(device, monkeypatch):
    """RECPEFT_BACKEND=triton sends both layers to the fused op — which pools E itself, so the
    base layer is not run, except for nn.Embedding with a padding_idx — and matches the torch
    backend."""
    calls = []
    real = fused.lora_embedding_bag
    monkeypatch.setattr(fused, "lora_embedding_bag", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    g = torch.Generator().manual_seed(21)
    bag = _layer(LoraEmbeddingBag, nn.EmbeddingBag(V, D, mode="mean", padding_idx=2)).to(device)
    _, _, bag_args = _module_inputs("offsets", LENGTHS, V, torch.int32, False, 2, g)
    emb = _layer(LoraEmbedding, nn.Embedding(V, D)).to(device)
    emb_pad = _layer(LoraEmbedding, nn.Embedding(V, D, padding_idx=2)).to(device)
    ids = torch.randint(0, V, (3, 5), generator=g)
    ids[1, 1] = 2
    cases = [
        (bag, tuple(a.to(device) if a is not None else None for a in bag_args), True),
        (emb, (ids.to(device),), True),
        (emb_pad, (ids.to(device),), False),
    ]
    for layer, args, fuses_base in cases:
        base_calls = []
        hook = layer.base_layer.register_forward_hook(lambda *_, seen=base_calls: seen.append(1))
        num_out = layer.base_layer(*args).shape
        base_calls.clear()
        dy = torch.randn(num_out, generator=g).to(device)
        monkeypatch.setenv("RECPEFT_BACKEND", "torch")
        expected, expected_grads = _run_layer(layer, args, dy)
        bound, bound_grads = _run_layer(abs_twin(layer, dtype=None), args, dy.abs())  # Σ|terms|, torch ops
        assert not calls
        base_calls.clear()
        monkeypatch.setenv("RECPEFT_BACKEND", "triton")
        out, grads = _run_layer(layer, args, dy)
        hook.remove()
        assert len(calls) == 2  # one fused call per active adapter
        assert (calls[0] is None) == fuses_base and calls[1] is not None  # base_output argument
        assert len(base_calls) == (0 if fuses_base else 1)
        calls.clear()
        assert_bag_close(out, expected, bound, computed=2, name="out")
        assert grads.keys() == expected_grads.keys() and len(grads) == 4  # A and B of both adapters
        for name in grads:
            assert_bag_close(grads[name], expected_grads[name], bound_grads[name].abs(), computed=2, name=name)


def test_dispatch_finds_the_triton_module():
    assert fused.__name__ == "recpeft.kernels.lora_embedding_bag"
    assert dispatch.triton_op("lora_embedding_bag") is fused.lora_embedding_bag


def test_validate_ids_switch(monkeypatch):
    """validate_ids=False skips the range check (and its host sync); torch then raises its own
    error for a bad id, where the check raised one naming the table."""
    bag = _layer(LoraEmbeddingBag, nn.EmbeddingBag(V, D))
    emb = _layer(LoraEmbedding, nn.Embedding(V, D))
    bad_ids, offsets = torch.tensor([1, 2, V]), torch.tensor([0])
    with pytest.raises(IndexError, match=f"tables.t0: id {V} at position 2"):
        bag(bad_ids, offsets)
    with pytest.raises(IndexError, match=f"tables.t0: id {V} at position 2"):
        emb(bad_ids)
    checks = []
    bags_module = importlib.import_module("recpeft.kernels.bags")
    monkeypatch.setattr(bags_module, "validate_ids", lambda *a: checks.append(a))
    embedding_module = importlib.import_module("recpeft.layers.embedding")
    monkeypatch.setattr(embedding_module, "validate_ids", lambda *a: checks.append(a))
    bag.validate_ids = emb.validate_ids = False
    good = torch.tensor([1, 2, 3])
    assert bag(good, offsets).shape == (1, D) and emb(good).shape == (3, D)
    assert not checks
    with pytest.raises(IndexError, match="index out of range"):  # torch's own, unnamed
        emb(bad_ids)
    with pytest.raises(TypeError, match="ids must be an int32 or int64 tensor"):  # dtype still checked
        emb(good.float())
    bag.validate_ids = emb.validate_ids = True
    bag(good, offsets), emb(good)
    assert len(checks) == 2
