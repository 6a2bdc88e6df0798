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
by adapter once (:func:`group_by_adapter`) and each adapter runs on its rows only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum

import torch
import torch.nn.functional as F

from .bags import BagLayout


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


def dropout_keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted-dropout mask: Bernoulli(1 − p) draws from torch's default generator, scaled by
    1/(1 − p); d(x) = x ⊙ mask. Drawn once in forward and saved for backward."""
    return torch.empty_like(x).bernoulli_(1.0 - p).div_(1.0 - p)


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


def _is_grouped(row_adapter: torch.Tensor) -> bool:
    """Rows already sorted by adapter (a batcher that groups requests by segment makes these)."""
    return row_adapter.numel() < 2 or bool((row_adapter[1:] >= row_adapter[:-1]).all())


def segmented_lora_linear(x, weight, bias, adapters: list[AdapterWeights | None], row_adapter):
    """y_i = x_i·Wᵀ + b + s_a·(d(x_i)·A_aᵀ)·B_aᵀ with a = row_adapter[i]; x is [M, K].

    Rows already grouped by adapter are updated in place slice by slice; otherwise each adapter
    gathers its rows (one sort for the batch), and its delta is added back with index_add.
    Measured (benchmarks/bench_routing.py, 64 adapters, 8192×512→512, r=16, 2 CPU cores):
    about 1.6x one merged layer for random order, 1.3x for a grouped batch."""
    y = F.linear(x, weight, bias)
    grouped = _is_grouped(row_adapter)
    if grouped:
        counts = torch.bincount(row_adapter + 1, minlength=len(adapters) + 1).tolist()
        ends = list(itertools.accumulate(counts))  # rows of adapter a: [ends[a], ends[a + 1])
        groups = [(a, slice(ends[a], ends[a + 1])) for a in range(len(adapters)) if counts[a + 1]]
    else:
        groups = group_by_adapter(row_adapter, len(adapters))
    for a, rows in groups:
        adapter = adapters[a]
        if adapter is None:
            continue
        x_a = x[rows] if grouped else x.index_select(0, rows)
        if adapter.dropout_p > 0:
            x_a = x_a * dropout_keep_mask(x_a, adapter.dropout_p)
        u = F.linear(x_a, adapter.lora_A)  # [rows, r]
        if grouped:
            y[rows].addmm_(u, adapter.lora_B.t(), alpha=adapter.scale)
        else:
            y.index_add_(0, rows, F.linear(u.mul_(adapter.scale), adapter.lora_B))
    return y


def select_bags(layout: BagLayout, bags: torch.Tensor, id_rows: torch.Tensor) -> BagLayout:
    """The sub-layout of ``bags`` (sorted bag indices), whose ids sit at ``id_rows``."""
    local = torch.full((layout.num_bags,), -1, dtype=torch.int64, device=bags.device)
    local[bags] = torch.arange(bags.numel(), device=bags.device)
    bag_of_id = local[layout.bag_of_id.index_select(0, id_rows)]
    counts = torch.bincount(bag_of_id, minlength=bags.numel())
    weights = layout.weights.index_select(0, id_rows) if layout.weights is not None else None
    return BagLayout(
        layout.ids.index_select(0, id_rows), bag_of_id, torch.cumsum(counts, 0) - counts, weights, bags.numel()
    )


def segmented_lora_bag_delta(
    layout: BagLayout, adapters: list[AdapterWeights | None], bag_adapter, out_dim: int, dtype
):
    """delta_j = s_a·(Σ w_i·A_a[i])·B_a with a = bag_adapter[j] (zero for −1): [nb, D]."""
    delta = torch.zeros(layout.num_bags, out_dim, dtype=dtype, device=bag_adapter.device)
    id_groups = dict(group_by_adapter(bag_adapter.index_select(0, layout.bag_of_id), len(adapters)))
    empty = layout.ids.new_zeros(0)
    for a, bags in group_by_adapter(bag_adapter, len(adapters)):
        adapter = adapters[a]
        if adapter is None:
            continue
        sub = select_bags(layout, bags, id_groups.get(a, empty))
        delta.index_add_(0, bags, lora_bag_delta(sub, adapter.lora_A, adapter.lora_B, adapter.scale))
    return delta
