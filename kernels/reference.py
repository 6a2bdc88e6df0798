"""Plain-PyTorch version of every adapter op: the CPU path and the test oracle.

Notation (DESIGN.md): x [M, K] inputs, W [N, K] frozen weight, b [N] bias, A [r, K] and B [N, r]
the linear adapter, s its scale; E [V, D] a frozen table, A [V, r] and B [r, D] its adapter.

LoRA linear (:class:`LoraLinearFunction`)::

    y  = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ            d = inverted dropout with keep mask m
    v  = dY·B                                  [M, r], shared by the gradients below
    dX = dY·W + s·(v·A) ⊙ m
    dA = s·vᵀ·d(x)        dB = s·dYᵀ·u,  u = d(x)·Aᵀ  [M, r]

Two routes compute it. Without dropout y = x·(W + s·B·A)ᵀ + b exactly, so the *merge* route forms
W' = W + s·B·A (K·N·r multiply-adds) and runs one library GEMM forward and one for dX. The
*epilogue* route runs the base GEMM and adds s·u·Bᵀ into its output; it costs M·r·(K + N) extra
and is the only route with dropout. :func:`choose_linear_route` picks the cheaper.

LoRA embedding bag (:class:`LoraPooledDelta`), bag j with ids I_j and weights w_i::

    delta_j = s·(Σ_{i∈I_j} w_i·A[i])·B         pooled in rank space first: r/D of the gather
    dB      = s·Σ_j pooled_jᵀ·dY_j
    dA[i]  += s·w_i·(dY_j·Bᵀ)                  only for ids in the batch: a sparse gradient

The gradient of A is a sparse COO tensor with one row per looked-up id, so backward never
allocates a dense V×r buffer. The plain lookup (``nn.Embedding``) is the same op with every id
its own bag.

Routing many adapters (``segmented_*``): row i uses adapter a_i or none (−1); rows are sorted
by adapter once (:func:`group_by_adapter`) and each adapter runs on its rows only. Two forms:

* a list of :class:`AdapterWeights` (``segmented_lora_linear``, ``segmented_lora_bag_delta``):
  the layers' form, one Python step per adapter here — the CPU path;
* adapters stacked, ranks padded to the largest R (``segmented_lora_linear_stacked``,
  ``segmented_lora_bag_stacked``): A_stack [n, R, K], B_stack [n, N, R] (linear) or
  A_stack [n, V, R], B_stack [n, R, D] (bags), scales s [n]. Zero padding rows of A and columns
  of B contribute exactly 0 (and get exactly 0 gradient), at the price of FLOPs and bytes in
  proportion to R, not r_a. Loop-free: :func:`segment_plan` cuts the rows, sorted by adapter,
  into tiles of one adapter each, and every tile runs as one batched product (``torch.bmm``) —
  the layout of the Triton kernels (:mod:`recpeft.kernels.segmented_lora`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import operator
import threading
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

from .bags import BagLayout
from .dropout import dropout_keep_mask
from .grouped import grouped_bag_delta, grouped_lora_linear


class LinearRoute(str, Enum):
    """How :class:`LoraLinearFunction` computes the adapter (see module docstring)."""

    MERGE = "merge"
    EPILOGUE = "epilogue"


def choose_linear_route(rows: int, in_features: int, out_features: int, dropout_active: bool) -> LinearRoute:
    """Merge W' = W + s·B·A (K·N·r work) when that is cheaper than the epilogue's M·r·(K + N),
    i.e. M·(K + N) ≥ K·N; dropout needs the epilogue. Both routes share the backward's skinny
    products, so forward cost decides. Measured on 2 CPU cores, fp32, K=N=512, r=16
    (benchmarks/bench_lora_linear.py): the merge route is 1.0x-1.1x the frozen layer at M=8192."""
    if dropout_active:
        return LinearRoute.EPILOGUE
    if rows * (in_features + out_features) >= in_features * out_features:
        return LinearRoute.MERGE
    return LinearRoute.EPILOGUE


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ with W frozen; see the module docstring for the gradients.

    Saves d(x), the dropout mask (epilogue with dropout only), A, B and W or W' (merge route),
    and x itself only when W is trainable under dropout: never an M×N intermediate.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float, route: LinearRoute):
        mask = dropout_keep_mask(x, dropout_p) if dropout_p > 0 else None
        dropped = x * mask if mask is not None else x
        if route is LinearRoute.MERGE:
            if mask is not None:
                raise ValueError("the merge route computes no dropout; use the epilogue route")
            gemm_weight = torch.addmm(weight, lora_B, lora_A, alpha=scale)  # W' = W + s·B·A
            y = F.linear(x, gemm_weight, bias)
        else:
            gemm_weight = weight
            u = F.linear(dropped.reshape(-1, x.shape[-1]), lora_A)  # [M, r]
            y = F.linear(x, weight, bias)
            y.view(-1, y.shape[-1]).addmm_(u, lora_B.t(), alpha=scale)
        # x itself only when a user unfroze W under dropout: dW = dYᵀ·x, not dYᵀ·d(x)
        undropped = x if mask is not None and ctx.needs_input_grad[1] else None
        ctx.save_for_backward(dropped, mask, undropped, gemm_weight, lora_A, lora_B)
        ctx.scale, ctx.route = scale, route
        return y

    @staticmethod
    def backward(ctx, grad_y):
        dropped, mask, undropped, gemm_weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scale
        need_x, need_w, need_b, need_a, need_b_lora = ctx.needs_input_grad[:5]
        g = grad_y.reshape(-1, grad_y.shape[-1])  # [M, N]
        x_d = dropped.reshape(-1, dropped.shape[-1])  # [M, K]
        v = g @ lora_B  # [M, r]
        grad_x = grad_w = grad_bias = grad_a = grad_b = None
        if need_x:
            grad_x = g @ gemm_weight  # dY·W' (merge) or dY·W (epilogue)
            if ctx.route is LinearRoute.EPILOGUE:
                lora_term = (v @ lora_A).mul_(s)
                grad_x += lora_term * mask.reshape(-1, mask.shape[-1]) if mask is not None else lora_term
            grad_x = grad_x.view(dropped.shape)
        if need_w:  # only when a user unfroze W; W' = W + s·B·A has dW' = dW
            x_base = undropped if undropped is not None else dropped
            grad_w = g.t() @ x_base.reshape(-1, x_base.shape[-1])
        if need_b:
            grad_bias = g.sum(0)
        if need_a:
            grad_a = (v.t() @ x_d).mul_(s)
        if need_b_lora:
            u = F.linear(x_d, lora_A)  # [M, r]
            # (uᵀ·dY)ᵀ: MKL runs this layout far faster than dYᵀ·u
            grad_b = (u.t() @ g).mul_(s).t().contiguous()
        return grad_x, grad_w, grad_bias, grad_a, grad_b, None, None, None


def lora_linear(
    x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float = 0.0, route: LinearRoute | None = None
):
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ for x of any leading shape [..., K]; ``dropout_p`` is the
    active dropout probability (0 in eval mode)."""
    if route is None:
        rows = x.numel() // max(x.shape[-1], 1)
        route = choose_linear_route(rows, weight.shape[1], weight.shape[0], dropout_p > 0)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), route)


class LoraPooledDelta(torch.autograd.Function):
    """base + s·(Σ_{i∈I_j} w_i·A[i])·B over a :class:`BagLayout` (base None: the delta alone);
    sparse gradient for A, the output gradient passes to base unchanged."""

    @staticmethod
    def forward(ctx, lora_A, lora_B, base, ids, bag_of_id, offsets, weights, scale: float):
        # [nb, r]; detached: torch's forward-only path
        pooled = pooled_rank_space(lora_A.detach(), ids, offsets, weights)
        ctx.save_for_backward(ids, bag_of_id, weights, pooled, lora_B)
        ctx.scale, ctx.table_shape = scale, lora_A.shape
        ctx.base_dtype = base.dtype if base is not None else None
        if base is None or base.dtype != pooled.dtype:  # mixed dtypes: promote as torch does
            delta = (pooled @ lora_B).mul_(scale)
            return delta if base is None else base + delta
        return torch.addmm(base, pooled, lora_B, alpha=scale)  # one pass over the output

    @staticmethod
    def backward(ctx, grad_out):
        ids, bag_of_id, weights, pooled, lora_B = ctx.saved_tensors
        s = ctx.scale
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            per_bag = F.linear(grad_out, lora_B).mul_(s)  # [nb, r] = s·dY_j·Bᵀ
            rows = per_bag.index_select(0, bag_of_id)  # [L, r]
            if weights is not None:
                rows.mul_(weights.unsqueeze(1))
            grad_a = torch.sparse_coo_tensor(ids.unsqueeze(0), rows, ctx.table_shape, check_invariants=False)
        if ctx.needs_input_grad[1]:
            grad_b = (pooled.t() @ grad_out).mul_(s)
        grad_base = grad_out.to(ctx.base_dtype) if ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_base, None, None, None, None, None


def pooled_rank_space(lora_A: torch.Tensor, ids, offsets, weights) -> torch.Tensor:
    """Σ_{i∈I_j} w_i·A[i] for every bag j: [nb, r]."""
    if offsets.numel() == 0:
        return lora_A.new_zeros(0, lora_A.shape[1])
    return F.embedding_bag(ids, lora_A, offsets, mode="sum", per_sample_weights=weights)


def lora_bag_delta(layout: BagLayout, lora_A, lora_B, scale: float, base=None) -> torch.Tensor:
    """base + s·(Σ w_i·A[i])·B for every bag of ``layout`` ([nb, D]; base None: the delta alone)."""
    return LoraPooledDelta.apply(
        lora_A, lora_B, base, layout.ids, layout.bag_of_id, layout.offsets, layout.weights, float(scale)
    )


def lora_embedding_bag(table, layout: BagLayout, lora_A, lora_B, scale: float, base_output=None):
    """pooled_j = Σ w_i·E[i] + s·(Σ w_i·A[i])·B: [nb, D]. ``base_output`` is the frozen bag's
    own result when the caller has it (the LoRA layer passes it so that a zero adapter leaves the
    base output bit for bit); otherwise it is pooled from ``layout``."""
    if base_output is None:
        base_output = (
            F.embedding_bag(layout.ids, table, layout.offsets, mode="sum", per_sample_weights=layout.weights)
            if layout.num_bags
            else table.new_zeros(0, table.shape[1])
        )
    return lora_bag_delta(layout, lora_A, lora_B, scale, base_output)


# ---------------------------------------------------------------------------------------------
# Many adapters in one batch
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterWeights:
    """One adapter of one layer, as the routed ops need it."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scale: float
    dropout_p: float = 0.0


def group_by_adapter(row_adapter: torch.Tensor, num_adapters: int) -> list[tuple[int, torch.Tensor]]:
    """Sort rows by adapter once: [(adapter index, its row indices)] for every adapter with rows.
    Rows with −1 (base model only) are left out."""
    order = torch.argsort(row_adapter, stable=True)
    counts = torch.bincount(row_adapter + 1, minlength=num_adapters + 1).tolist()
    groups = torch.split(order, counts)
    return [(a, rows) for a, rows in enumerate(groups[1:]) if rows.numel()]


# Many adapters, few rows each (a serving batch of a few hundred rows over hundreds of adapters):
# the loop's one Python-level step per adapter, tens of microseconds of dispatch however few its
# rows, is then nearly all the time. Each row can instead gather its own adapter's factors from
# the padded stacks (BGMV, as Punica's kernels do on a GPU), both products running as one batched
# matmul of M tiny products:
#     u_m = A_{a_m}·d(x_m)  (bmm over [M, R, K] × [M, K, 1]),  y_m += s_{a_m}·B_{a_m}·u_m
# which gathers M·R·(K + N) weights. Measured on one CPU thread (M, K = N, r, adapters): the
# gather won from 256×64 r4 ×256 (1.9 against 6.1 ms) to 512×128 r4 ×64 (2.1 against 2.7 ms) and
# lost from 1024×64 r4 ×16 (1.6 against 1.0 ms) to 2048×128 r8 ×64 (14 against 5 ms): it pays
# while the gathered weights stay under about GATHER_PER_ADAPTER per adapter in the batch (the
# break-even of those runs, about 10k), and from GATHER_MIN_ADAPTERS adapters on.
GATHER_MIN_ADAPTERS = 8
GATHER_PER_ADAPTER = 8192
GATHER_MAX_ELEMENTS = 1 << 24  # and never more than this many gathered weights (64 MB of fp32)


@dataclass(frozen=True)
class ListFacts:
    """What the routed ops read off a list of AdapterWeights (or None) before any work: kept on a
    layer's :class:`RoutedAdapters` (:func:`list_facts`), since a serving loop routes the same
    adapters call after call and at hundreds of adapters these scans are a large part of a small
    batch's time.

    Attributes:
        present: the adapters that are not None, in order.
        exists: [len(adapters)] bool, which entries are not None.
        factors: every present adapter's lora_A, then every lora_B.
        max_a: the largest lora_A size along each dimension.
        one_vocabulary: every present lora_A has the same number of rows (bags' A [V, r]).
        numel_a: Σ lora_A.numel() over the present adapters.
        dtypes: the factors' dtypes.
    """

    present: tuple
    exists: torch.Tensor
    factors: tuple
    max_a: tuple
    one_vocabulary: bool
    numel_a: int
    dtypes: frozenset


class RoutedAdapters(tuple):
    """A layer's routed adapters (one AdapterWeights or None per routed name), immutable, with
    its :class:`ListFacts` computed on first use and kept: a layer keeps one such tuple while its
    adapters, scales and dropouts stay the same (``LoraWeightLayer.routed_adapters``)."""

    @functools.cached_property
    def facts(self) -> ListFacts:
        return _facts_of(self)


def list_facts(adapters) -> ListFacts:
    """:class:`ListFacts` of ``adapters``: kept on a :class:`RoutedAdapters`, computed afresh
    for any other sequence (which its caller may change between calls)."""
    return adapters.facts if isinstance(adapters, RoutedAdapters) else _facts_of(adapters)


def _facts_of(adapters) -> ListFacts:
    present = tuple(a for a in adapters if a is not None)
    shapes = [tuple(a.lora_A.shape) for a in present]
    return ListFacts(
        present=present,
        exists=torch.tensor([a is not None for a in adapters], dtype=torch.bool),
        factors=(*(a.lora_A for a in present), *(a.lora_B for a in present)),
        max_a=tuple(map(max, zip(*shapes))) if shapes else (0, 0),
        one_vocabulary=len({shape[0] for shape in shapes}) == 1,
        numel_a=sum(a.lora_A.numel() for a in present),
        dtypes=frozenset(t.dtype for a in present for t in (a.lora_A, a.lora_B)),
    )


def _gathers(work: int, used: int) -> bool:
    """Whether gathering ``work`` weights beats a loop over ``used`` adapters (see above)."""
    return used >= GATHER_MIN_ADAPTERS and work <= min(GATHER_PER_ADAPTER * used, GATHER_MAX_ELEMENTS)


def _adapters_in_batch(ids: torch.Tensor, adapters: list) -> int:
    """How many of ``adapters`` (not None) the batch's ``ids`` use."""
    if not ids.numel():
        return 0
    counts = torch.bincount(ids.to(torch.int64) + 1, minlength=len(adapters) + 1)[1:]
    return int(((counts > 0) & list_facts(adapters).exists.to(counts.device)).sum())


# Stacks built without autograd, kept for the next call (a serving loop routes the same adapters
# call after call): keyed by the routed list's facts (one object per RoutedAdapters) and the
# sum of its factors' versions, which an in-place update (training, a load) increases, so a
# changed factor is never served from here. An entry holds its facts, and so its factors, until
# the cache is next cleared. Inside :func:`unchanged_factors` the version reads (one per factor
# and layer: about 1 ms a call at 256 adapters over 8 layers) are skipped.
_STACKS: dict[tuple, tuple] = {}
_STACKS_KEPT = 32
_VERSION = operator.attrgetter("_version")
_PROMISES = threading.local()


@contextlib.contextmanager
def unchanged_factors(generation: Hashable | None = None):
    """Within it, on this thread, cached stacks are reused without reading their factors'
    versions: the caller promises that the factors of the model it runs have not changed in place
    since their stacks were cached (an AdapterBank, whose model only gains and loses adapters:
    new parameters, so new routed lists and new cache keys).

    ``generation`` (optional): the caller's name for the model's current set of adapters, which
    it changes whenever an adapter is added or removed (the bank: a counter). The promise then
    also covers the layers' routed lists: a layer that built or checked its list under the same
    generation reuses it without comparing its adapters one by one (:func:`promised_generation`)."""
    outer = getattr(_PROMISES, "generation", None), getattr(_PROMISES, "depth", 0)
    _PROMISES.generation, _PROMISES.depth = generation, outer[1] + 1
    try:
        yield
    finally:
        _PROMISES.generation, _PROMISES.depth = outer


def promised_generation() -> Hashable | None:
    """The ``generation`` of the innermost :func:`unchanged_factors` open on this thread, or None."""
    return getattr(_PROMISES, "generation", None)


def _versions(tensors) -> int:
    """Σ of the tensors' versions, or 0 inside :func:`unchanged_factors`."""
    return 0 if getattr(_PROMISES, "depth", 0) else sum(map(_VERSION, tensors))


def _stacks(adapters: Sequence[AdapterWeights | None], ids: torch.Tensor, rank_dim_a: int, rank_dim_b: int):
    """(RoutedStack, A_stack, B_stack) of ``adapters``, ranks zero-padded to the largest. Without
    autograd, everything but the renumbered ids comes from :data:`_STACKS` when ``adapters`` is
    the :class:`RoutedAdapters` it was built from and no factor has changed in place since
    (tensor versions); any other sequence builds its stacks afresh."""
    facts = list_facts(adapters)
    present, tensors = facts.present, facts.factors
    cached = not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)
    # versions only grow, so their sum changes whenever one of these tensors changes in place
    key = (rank_dim_a, rank_dim_b, id(facts), _versions(tensors)) if cached else None
    entry = _STACKS.get(key) if key is not None else None
    if entry is None:
        stack = routed_stack(adapters, ids, rank_dim_a)
        lora_A = padded_stack([a.lora_A for a in present], stack.rank, rank_dim_a)
        lora_B = padded_stack([a.lora_B for a in present], stack.rank, rank_dim_b)
        if key is None:
            return stack, lora_A, lora_B
        if len(_STACKS) >= _STACKS_KEPT:
            _STACKS.clear()
        remap = torch.full((len(adapters) + 1,), -1, dtype=torch.int64, device=ids.device)
        remap[torch.tensor(stack.present, dtype=torch.int64, device=ids.device) + 1] = torch.arange(
            len(stack.present), device=ids.device
        )
        _STACKS[key] = entry = (facts, stack, remap, lora_A, lora_B)  # facts alive: its id stays its own
    _, stack, remap, lora_A, lora_B = entry
    renumbered = dataclasses.replace(stack, ids=remap.to(ids.device)[ids.to(torch.int64) + 1])
    return renumbered, lora_A, lora_B


def _matvecs(mats: torch.Tensor, vecs: torch.Tensor) -> torch.Tensor:
    """out[m, p] = Σ_q mats[m, p, q]·vecs[m, q]: M small products, one per row. In fp32 and fp64
    as one broadcast multiply and a sum over q: a CPU bmm of M [P, Q] × [Q, 1] products runs
    each as a matmul of its own, 4–7x slower at M = 256, P = 4, Q = 64–512 (one thread). Other
    dtypes keep bmm, whose products accumulate in fp32 (a bf16 multiply would round each one)."""
    if mats.dtype in (torch.float32, torch.float64):
        return (mats * vecs.unsqueeze(1)).sum(dim=2)
    return torch.bmm(mats, vecs.unsqueeze(2)).squeeze(2)


def _gathered_linear(y, x, adapters, row_adapter):
    """y + s_a·B_a·A_a·d(x) per row, each row gathering its adapter's factors (see above)."""
    stack, lora_A, lora_B = _stacks(adapters, row_adapter, 0, 1)  # [n, R, K], [n, N, R]
    rows = (stack.ids >= 0).nonzero().squeeze(1)
    owner = stack.ids.index_select(0, rows)
    x_rows = x.index_select(0, rows)
    if stack.dropout_p is not None:
        keep = (1.0 - stack.dropout_p.to(x.dtype)).index_select(0, owner)[:, None].expand_as(x_rows)
        x_rows = x_rows * (torch.bernoulli(keep) / keep)
    u = _matvecs(lora_A.index_select(0, owner), x_rows)  # [m, R]
    u = u * stack.scales.to(x.dtype).index_select(0, owner)[:, None]
    return y.index_add(0, rows, _matvecs(lora_B.index_select(0, owner), u))


def _gathered_bag_delta(layout: BagLayout, adapters, bag_adapter, dtype):
    """s_a·B_a·(Σ w_i·A_a[i]) per bag, each bag pooling from its own adapter's table and
    gathering its B (tables of one V, stacked; see above). [nb, D]."""
    stack, lora_A, lora_B = _stacks(adapters, bag_adapter, 1, 0)  # [n, V, R], [n, R, D]
    n, vocab, rank = lora_A.shape
    owner_of_id = stack.ids.index_select(0, layout.bag_of_id)
    kept = (owner_of_id >= 0).nonzero().squeeze(1)
    flat = owner_of_id.index_select(0, kept) * vocab + layout.ids.index_select(0, kept)
    weights = layout.weights.index_select(0, kept) if layout.weights is not None else None
    bags = layout.bag_of_id.index_select(0, kept)
    pooled = torch.zeros(layout.num_bags, rank, dtype=lora_A.dtype, device=lora_A.device)
    rows = lora_A.reshape(n * vocab, rank).index_select(0, flat)
    pooled.index_add_(0, bags, rows if weights is None else rows * weights.to(rows.dtype)[:, None])
    routed = (stack.ids >= 0).nonzero().squeeze(1)
    owner = stack.ids.index_select(0, routed)
    u = pooled.index_select(0, routed) * stack.scales.to(pooled.dtype).index_select(0, owner)[:, None]
    delta = torch.zeros(layout.num_bags, lora_B.shape[2], dtype=dtype, device=lora_B.device)
    b_rows = lora_B.index_select(0, owner).transpose(1, 2)  # [m, D, R]
    return delta.index_add_(0, routed, _matvecs(b_rows, u).to(dtype))


def segmented_lora_linear(x, weight, bias, adapters: Sequence[AdapterWeights | None], row_adapter):
    """y_i = x_i·Wᵀ + b + s_a·(d(x_i)·A_aᵀ)·B_aᵀ with a = row_adapter[i]; x is [M, K].

    With many adapters in the batch and few rows each (:func:`_gathers`): each row gathers its
    own adapter's factors (BGMV). Otherwise one step per adapter over the rows grouped once
    (:func:`recpeft.kernels.grouped.grouped_lora_linear`: slices of x and y when the rows arrive
    grouped, one gather and one scatter when not). Measured (benchmarks/bench_routing.py, 64
    adapters, 8192×512→512, r=16, 2 CPU cores): 1.44x one merged layer for random order, 1.27x
    for a grouped batch."""
    facts = list_facts(adapters)
    if len(facts.present) >= GATHER_MIN_ADAPTERS:
        work = x.shape[0] * facts.max_a[0] * (x.shape[1] + weight.shape[0])
        if _gathers(work, _adapters_in_batch(row_adapter, adapters)):
            return _gathered_linear(F.linear(x, weight, bias), x, adapters, row_adapter)
    return grouped_lora_linear(x, weight, bias, adapters, row_adapter)


def segmented_lora_bag_delta(
    layout: BagLayout, adapters: Sequence[AdapterWeights | None], bag_adapter, out_dim: int, dtype
):
    """delta_j = s_a·(Σ w_i·A_a[i])·B_a with a = bag_adapter[j] (zero for −1): [nb, D]. With
    many adapters in the batch and few bags each (:func:`_gathers`), tables of one V small
    enough to stack (:data:`GATHER_MAX_ELEMENTS`) and no gradient wanted: each bag pools from
    its own adapter's table and gathers its B (BGMV); else a step per adapter."""
    facts = list_facts(adapters)
    # a table's gradient stays sparse (its looked-up rows) only in the loop: training keeps it
    training = torch.is_grad_enabled() and any(t.requires_grad for t in facts.factors)
    if not training and len(facts.present) >= GATHER_MIN_ADAPTERS and facts.one_vocabulary:
        stacked = facts.numel_a  # the tables side by side, once per call
        work = layout.num_bags * facts.max_a[1] * out_dim + layout.ids.numel()
        if stacked <= GATHER_MAX_ELEMENTS and _gathers(work, _adapters_in_batch(bag_adapter, adapters)):
            return _gathered_bag_delta(layout, adapters, bag_adapter, dtype)
    return grouped_bag_delta(layout, adapters, bag_adapter, out_dim, dtype)


# ---------------------------------------------------------------------------------------------
# Many adapters in one batch, stacked
# ---------------------------------------------------------------------------------------------

# Rows per tile of the loop-free reference: a tile is padded up to this many rows (at most
# n·(tile − 1) padded rows in all), and every tile gathers its adapter's A and B (T·R·(K + N)
# elements for T ≤ M/tile + n tiles): 64 keeps both small beside x at M = 8192, n = 64.
REFERENCE_TILE = 64


@dataclass(frozen=True)
class SegmentPlan:
    """Rows grouped by adapter, cut into tiles of one adapter each (SGMV's layout).

    Sorting puts the rows of adapter 0, 1, ... after those with −1 (and ids outside
    [0, n) into no group: they get no adapter). Tile t covers the sorted positions
    [tile_start[t], min(tile_start[t] + block_m, tile_end[t])) of adapter tile_adapter[t]. There
    are ``cdiv(M, block_m) + n`` tiles, at least as many as the groups need, so nothing is read
    back to the host; the tiles past the last have adapter −1 and no rows.

    Attributes:
        order: [M] int64, row indices sorted by adapter (stable).
        tile_adapter: [T] int32, the adapter of each tile (−1: no work).
        tile_start: [T] int64, first sorted position of each tile.
        tile_end: [T] int64, end of its adapter's group (a tile stops at it).
        block_m: rows per tile.
    """

    order: torch.Tensor
    tile_adapter: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    block_m: int

    @property
    def num_tiles(self) -> int:
        return self.tile_adapter.numel()


def segment_plan(row_adapter: torch.Tensor, num_adapters: int, block_m: int) -> SegmentPlan:
    """The :class:`SegmentPlan` of ``row_adapter`` [M] (ids in [−1, n)): one stable sort, group
    ends by a binary search in the sorted ids, tiles per group by a cumulative sum — no loop over
    adapters, and no device-to-host copy."""
    rows = row_adapter.numel()
    device = row_adapter.device
    sorted_ids, order = torch.sort(row_adapter.to(torch.int64), stable=True)
    tile = torch.arange(-(-rows // block_m) + num_adapters, device=device)
    if num_adapters == 0:
        zero = torch.zeros_like(tile)
        return SegmentPlan(order, (zero - 1).to(torch.int32), zero, zero, block_m)
    groups = torch.arange(num_adapters, device=device)
    starts = torch.searchsorted(sorted_ids, groups)  # [n] first position of each adapter's rows
    ends = torch.searchsorted(sorted_ids, groups, right=True)
    tiles = (ends - starts + block_m - 1) // block_m  # [n] tiles per adapter
    tiles_end = torch.cumsum(tiles, 0)
    adapter = torch.searchsorted(tiles_end, tile, right=True)  # n: past the last tile
    valid = adapter < num_adapters
    clamped = adapter.clamp(max=num_adapters - 1)
    first_tile = tiles_end[clamped] - tiles[clamped]
    tile_start = torch.where(valid, starts[clamped] + (tile - first_tile) * block_m, 0)
    tile_end = torch.where(valid, ends[clamped], 0)
    tile_adapter = torch.where(valid, clamped, -1).to(torch.int32)
    return SegmentPlan(order, tile_adapter, tile_start, tile_end, block_m)


def plan_tile_rows(plan: SegmentPlan, rows: int) -> torch.Tensor:
    """[T, block_m] int64: the row index at each position of each tile, ``rows`` (one past the
    last row: a zero row the caller appends) where the tile has no row."""
    pos = plan.tile_start[:, None] + torch.arange(plan.block_m, device=plan.order.device)
    inside = pos < plan.tile_end[:, None]
    if rows == 0:
        return torch.full_like(pos, rows)
    return torch.where(inside, plan.order[pos.clamp(max=rows - 1)], rows)


def check_stacked(lora_A, lora_B, scales, ids, *, a_shape: tuple, b_shape: tuple, name: str) -> int:
    """n after checking the stacked operands: lora_A of ``a_shape`` and lora_B of ``b_shape``
    (−1: any size), scales [n], the ids a 1-D int32/int64 tensor. Raises a one-line
    ValueError/TypeError naming the op ``name`` and the field."""
    if lora_A.dim() != 3 or lora_B.dim() != 3:
        raise ValueError(
            f"{name}: lora_A and lora_B must be stacked 3-D tensors, "
            f"got {tuple(lora_A.shape)} and {tuple(lora_B.shape)}"
        )
    for label, tensor, expected in (("lora_A", lora_A, a_shape), ("lora_B", lora_B, b_shape)):
        if any(e >= 0 and g != e for g, e in zip(tensor.shape, expected)):
            shown = tuple("?" if e < 0 else e for e in expected)
            raise ValueError(f"{name}: {label} has shape {tuple(tensor.shape)}, expected {shown}")
    n = lora_A.shape[0]
    if not isinstance(scales, torch.Tensor) or tuple(scales.shape) != (n,):
        got = tuple(scales.shape) if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"{name}: scales must be a [{n}] tensor (one per stacked adapter), got {got}")
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: adapter ids must be a 1-D int32/int64 tensor, got {ids.dtype} {tuple(ids.shape)}")
    return n


def _tiled_delta(u_tiles, proj, scales, tile_adapter) -> torch.Tensor:
    """s_a·u·projᵀ per tile: u_tiles [T, tile, R], proj [n, C, R] → [T, tile, C]."""
    adapter = tile_adapter.clamp(min=0).to(torch.int64)  # tiles without rows have zero u
    scaled = u_tiles * scales.to(u_tiles.dtype)[adapter][:, None, None]
    return torch.bmm(scaled, proj[adapter].transpose(1, 2))


def _scatter_rows(base: torch.Tensor, rows: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """base + delta scattered to ``rows`` ([T, tile]; index len(base) is dropped)."""
    padded = torch.cat([base, base.new_zeros(1, base.shape[1])])
    return padded.index_add(0, rows.reshape(-1), delta.reshape(-1, base.shape[1]).to(base.dtype))[:-1]


def segmented_lora_linear_stacked(x, weight, bias, lora_A, lora_B, scales, row_adapter, dropout_p=None):
    """y_i = x_i·Wᵀ + b + s_a·(d_a(x_i)·A_aᵀ)·B_aᵀ, a = row_adapter[i] (−1: none); x [M, K],
    lora_A [n, R, K], lora_B [n, N, R], scales [n], dropout_p [n] or None (inverted dropout of
    probability p_a on the adapter's input). Loop-free (module docstring); autograd gives dX, dA
    and dB, each adapter's gradient in its own slice."""
    m, k = x.shape
    n_out = weight.shape[0]
    check_stacked(
        lora_A,
        lora_B,
        scales,
        row_adapter,
        a_shape=(-1, -1, k),
        b_shape=(-1, n_out, lora_A.shape[1]),
        name="segmented_lora_linear_stacked",
    )
    y = F.linear(x, weight, bias)
    plan = segment_plan(row_adapter, lora_A.shape[0], REFERENCE_TILE)
    if m == 0 or lora_A.shape[0] == 0:
        return y
    rows = plan_tile_rows(plan, m)
    x_tiles = torch.cat([x, x.new_zeros(1, k)])[rows]  # [T, tile, K]
    adapter = plan.tile_adapter.clamp(min=0).to(torch.int64)
    if dropout_p is not None:
        keep = (1.0 - dropout_p.to(torch.float32))[adapter][:, None, None].expand(x_tiles.shape)
        x_tiles = x_tiles * (torch.bernoulli(keep) / keep).to(x.dtype)
    u = torch.bmm(x_tiles, lora_A[adapter].transpose(1, 2))  # [T, tile, R]
    return _scatter_rows(y, rows, _tiled_delta(u, lora_B, scales, plan.tile_adapter))


class SegmentedPooled(torch.autograd.Function):
    """pooled_j = Σ_{i∈I_j} w_i·A_stack[a_j, i] over a flat (adapter·V + id) index; A's gradient is
    a sparse COO [n, V, R] tensor with one row per looked-up (adapter, id)."""

    @staticmethod
    def forward(ctx, lora_A, flat_ids, offsets, weights, bag_of_id):
        n, v, r = lora_A.shape
        pooled = pooled_rank_space(lora_A.detach().reshape(n * v, r), flat_ids, offsets, weights)
        ctx.save_for_backward(flat_ids, weights, bag_of_id)
        ctx.shape = (n, v, r)
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):
        flat_ids, weights, bag_of_id = ctx.saved_tensors
        n, v, r = ctx.shape
        values = grad_pooled.index_select(0, bag_of_id)
        if weights is not None:
            values = values * weights.unsqueeze(1)
        indices = torch.stack([flat_ids // v, flat_ids % v])
        grad = torch.sparse_coo_tensor(indices, values, (n, v, r), check_invariants=False)
        return grad, None, None, None, None


def segmented_lora_bag_stacked(layout: BagLayout, lora_A, lora_B, scales, bag_adapter, base_output=None):
    """base_j + s_a·(Σ_{i∈I_j} w_i·A_a[i])·B_a with a = bag_adapter[j] (−1: none), over the bags of
    ``layout``; lora_A [n, V, R], lora_B [n, R, D], scales [n]; base_output [nb, D] or None (the
    delta alone). Sparse gradient for lora_A (rows of the batch's (adapter, id) pairs only)."""
    n, vocab, rank = lora_A.shape
    check_stacked(
        lora_A,
        lora_B,
        scales,
        bag_adapter,
        a_shape=(-1, -1, -1),
        b_shape=(n, rank, -1),
        name="segmented_lora_bag_stacked",
    )
    if bag_adapter.numel() != layout.num_bags:
        raise ValueError(
            f"segmented_lora_bag_stacked: {bag_adapter.numel()} bag adapter ids for {layout.num_bags} bags"
        )
    dim = lora_B.shape[2]
    base = base_output if base_output is not None else lora_B.new_zeros(layout.num_bags, dim)
    if layout.num_bags == 0 or n == 0:
        return base
    adapter_of_id = bag_adapter.to(torch.int64).index_select(0, layout.bag_of_id)
    kept = ((adapter_of_id >= 0) & (adapter_of_id < n)).nonzero().squeeze(1)
    bag_of_id = layout.bag_of_id.index_select(0, kept)
    counts = torch.bincount(bag_of_id, minlength=layout.num_bags)
    flat_ids = adapter_of_id.index_select(0, kept) * vocab + layout.ids.index_select(0, kept)
    weights = layout.weights.index_select(0, kept) if layout.weights is not None else None
    pooled = SegmentedPooled.apply(lora_A, flat_ids, torch.cumsum(counts, 0) - counts, weights, bag_of_id)
    plan = segment_plan(bag_adapter, n, REFERENCE_TILE)
    rows = plan_tile_rows(plan, layout.num_bags)
    u_tiles = torch.cat([pooled, pooled.new_zeros(1, rank)])[rows]  # [T, tile, R]
    return _scatter_rows(base, rows, _tiled_delta(u_tiles, lora_B.transpose(1, 2), scales, plan.tile_adapter))


@dataclass(frozen=True)
class RoutedStack:
    """The routed adapters of a layer that exist, in stacked order, for the stacked ops.

    Attributes:
        present: indices (into the routed list) of the adapters that exist, in stacked order.
        ids: the per-row or per-bag ids renumbered to the stacked order; −1 for none and for
            adapters the layer does not have.
        scales: [n] float32 s_a.
        dropout_p: [n] float32 p_a, or None when no adapter drops.
        ranks: r_a of each stacked adapter; R = max(ranks) (0 when none).
    """

    present: list[int]
    ids: torch.Tensor
    scales: torch.Tensor
    dropout_p: torch.Tensor | None
    ranks: list[int]

    @property
    def rank(self) -> int:
        return max(self.ranks, default=0)


def routed_stack(adapters: Sequence[AdapterWeights | None], ids: torch.Tensor, rank_dim: int) -> RoutedStack:
    """:class:`RoutedStack` of ``adapters`` (r_a = lora_A.shape[rank_dim]) for ``ids``."""
    present = [i for i, a in enumerate(adapters) if a is not None]
    remap = torch.full((len(adapters) + 1,), -1, dtype=torch.int64)
    remap[torch.tensor(present, dtype=torch.int64) + 1] = torch.arange(len(present))
    device = ids.device
    remapped = remap.to(device)[ids.to(torch.int64) + 1]
    weights = [adapters[i] for i in present]
    scales = torch.tensor([a.scale for a in weights], dtype=torch.float32, device=device)
    dropping = any(a.dropout_p > 0 for a in weights)
    dropout = torch.tensor([a.dropout_p for a in weights], dtype=torch.float32, device=device) if dropping else None
    return RoutedStack(present, remapped, scales, dropout, [a.lora_A.shape[rank_dim] for a in weights])


def padded_stack(tensors: list[torch.Tensor], rank: int, dim: int) -> torch.Tensor:
    """The tensors stacked along a new first dimension, each zero-padded along ``dim`` (its rank
    dimension) to ``rank``. Differentiable: each input gets the gradient of its own slice."""
    padded = []
    for t in tensors:
        widths = [0, 0] * t.dim()
        widths[2 * (t.dim() - 1 - dim) + 1] = rank - t.shape[dim]  # F.pad counts from the last dim
        padded.append(F.pad(t, widths) if rank > t.shape[dim] else t)
    return torch.stack(padded)
