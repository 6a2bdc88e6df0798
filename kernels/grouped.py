"""Many adapters in one batch on the CPU: one step per adapter over rows grouped once.

The layers' routed ops (``reference.segmented_lora_linear``, ``segmented_lora_bag_delta``) come
here when the batch holds many rows per adapter. Rows (or bags) are sorted by adapter once per
call (:func:`adapter_groups`); adapter a's rows are then the span [start_a, end_a) of the sorted
batch, and each span runs SGMV's shrink and expand as two small GEMMs.

Linear (:class:`GroupedLoraLinear`), x_g the span's rows, d_a its adapter's dropout (mask m_a)::

    y    = x·Wᵀ + b
    u_a  = s_a·d_a(x_g)·A_aᵀ            [m_a, r_a]    (scaled: dB needs s_a·u, nothing else u)
    y_g += u_a·B_aᵀ                     [m_a, N]
    v_a  = s_a·dY_g·B_a                 [m_a, r_a]
    dB_a = dY_gᵀ·u_a    dA_a = v_aᵀ·d_a(x_g)
    dX   = dY·W,  dX_g += (v_a·A_a) ⊙ m_a

Embedding bag (:class:`GroupedBagDelta`), bags sorted by adapter with their ids, p_a the span's
pooled rows in rank space::

    p_a  = Σ_{i∈I_j} w_i·A_a[i]  per bag j of the span   [m_a, r_a]
    δ_g  = s_a·p_a·B_a                                   [m_a, D]
    dB_a = s_a·p_aᵀ·dδ_g    dA_a[i] += s_a·w_i·(dδ_j·B_aᵀ)  (sparse: the span's ids only)

Why a Function of its own rather than autograd through the loop: the backward of each
per-adapter gather or slice is a zero-filled gradient of the whole batch (64 adapters at
8192×512 fp32: 64 × 16 MB written and summed per layer, most of a training step). Here every
gradient lands in one buffer of the batch's size. When the rows arrive grouped (a batcher that
sorts by segment, or ``PeftModel(..., adapter_ids=..., group_batch=True)``), spans are row
ranges of x and y themselves and nothing is gathered or scattered; otherwise the routed rows
are gathered once (x[rows]) and their deltas scattered back once (index_add).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .bags import BagLayout
from .dropout import dropout_keep_mask


@dataclass(frozen=True)
class AdapterGroups:
    """The routed rows of a batch in adapter order.

    Attributes:
        rows: [m_r] int64, the rows that have an adapter, in span order; None when the batch is
            grouped already and spans index its rows directly.
        spans: (adapter index, start, end) per adapter with rows, positions in ``rows`` (or in
            the batch when ``rows`` is None).
    """

    rows: torch.Tensor | None
    spans: tuple[tuple[int, int, int], ...]

    @property
    def routed(self) -> int:
        """How many rows have an adapter."""
        return sum(end - start for _, start, end in self.spans)


def is_grouped(row_adapter: torch.Tensor) -> bool:
    """Whether the ids are sorted (rows already grouped by adapter)."""
    return row_adapter.numel() < 2 or bool((row_adapter[1:] >= row_adapter[:-1]).all())


def adapter_groups(row_adapter: torch.Tensor, present: list[bool]) -> AdapterGroups:
    """:class:`AdapterGroups` of ``row_adapter`` [M] (ids in [−1, n)); rows whose adapter is −1
    or not ``present`` are left out. One bincount and, unless already grouped, one stable sort."""
    ids = row_adapter.to(torch.int64)
    counts = torch.bincount(ids + 1, minlength=len(present) + 1).tolist()
    starts = list(itertools.accumulate(counts, initial=0))  # adapter a: [starts[a + 1], starts[a + 2])
    kept = [a for a, here in enumerate(present) if here and counts[a + 1]]
    if is_grouped(ids):
        return AdapterGroups(None, tuple((a, starts[a + 1], starts[a + 2]) for a in kept))
    order = torch.argsort(ids, stable=True)
    spans, pieces, position = [], [], 0
    for a in kept:
        size = counts[a + 1]
        spans.append((a, position, position + size))
        pieces.append(order[starts[a + 1] : starts[a + 2]])
        position += size
    # no row of a missing adapter: the routed rows are one slice of the order
    contiguous = all(here or not counts[a + 1] for a, here in enumerate(present))
    rows = order[counts[0] :] if contiguous or not pieces else torch.cat(pieces)
    return AdapterGroups(rows, tuple(spans))


class GroupedLoraLinear(torch.autograd.Function):
    """y = x·Wᵀ + b + per span u_a·B_aᵀ (module docstring); gradients for x, W, b and every
    adapter's A and B, each adapter's in its own tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups: AdapterGroups, scales, dropouts, *factors):
        y = F.linear(x, weight, bias)
        grouped = groups.rows is None
        xs = x if grouped else x.index_select(0, groups.rows)
        out = y if grouped else y.new_empty(groups.routed, y.shape[1])
        dropped_inputs, masks, us = [], [], []
        per_span = zip(groups.spans, factors[0::2], factors[1::2], scales, dropouts)
        for (_, start, end), lora_A, lora_B, scale, p in per_span:
            x_g = xs[start:end]
            mask = dropout_keep_mask(x_g, p) if p > 0 else None
            dropped = x_g if mask is None else x_g * mask
            u = F.linear(dropped, lora_A).mul_(scale)
            if grouped:
                out[start:end].addmm_(u, lora_B.t())
            else:
                torch.mm(u, lora_B.t(), out=out[start:end])
            dropped_inputs.append(None if mask is None else dropped)  # else a view of xs, sliced again
            masks.append(mask)
            us.append(u)
        if not grouped and groups.spans:
            y.index_add_(0, groups.rows, out)
        ctx.groups, ctx.scales, ctx.masks, ctx.dropped = groups, scales, masks, dropped_inputs
        ctx.xs = None if grouped else xs  # grouped: x itself, saved below
        keep_x = grouped or ctx.needs_input_grad[1]  # x for the spans' slices, or for dW
        ctx.save_for_backward(x if keep_x else None, weight, *us, *factors)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, weight, *rest = ctx.saved_tensors
        groups, n = ctx.groups, len(ctx.groups.spans)
        us, factors = rest[:n], rest[n:]
        needs = ctx.needs_input_grad
        grad_x = grad_y.mm(weight) if needs[0] else None
        grad_w = grad_y.t().mm(x) if needs[1] else None
        grad_b = grad_y.sum(0) if needs[2] else None
        grouped = groups.rows is None
        grad_ys = grad_y if grouped else grad_y.index_select(0, groups.rows)
        grad_xs = grad_x if grouped or grad_x is None else grad_x.new_empty(groups.routed, grad_x.shape[1])
        xs = x if grouped else ctx.xs
        grads = []
        for i, (_, start, end) in enumerate(groups.spans):
            lora_A, lora_B = factors[2 * i], factors[2 * i + 1]
            g = grad_ys[start:end]
            v = g.mm(lora_B).mul_(ctx.scales[i])
            dropped = xs[start:end] if ctx.dropped[i] is None else ctx.dropped[i]
            grads.append(v.t().mm(dropped) if needs[6 + 2 * i] else None)
            grads.append(g.t().mm(us[i]) if needs[7 + 2 * i] else None)
            if grad_x is None:
                continue
            mask = ctx.masks[i]
            if grouped and mask is None:
                grad_xs[start:end].addmm_(v, lora_A)
            elif grouped:
                grad_xs[start:end].add_(v.mm(lora_A).mul_(mask))
            else:
                torch.mm(v, lora_A, out=grad_xs[start:end])
                if mask is not None:
                    grad_xs[start:end].mul_(mask)
        if grad_x is not None and not grouped and groups.spans:
            grad_x.index_add_(0, groups.rows, grad_xs)
        return grad_x, grad_w, grad_b, None, None, None, *grads


def grouped_lora_linear(x, weight, bias, adapters, row_adapter) -> torch.Tensor:
    """y_i = x_i·Wᵀ + b + s_a·(d(x_i)·A_aᵀ)·B_aᵀ, a = row_adapter[i]; ``adapters`` one
    AdapterWeights or None per routed adapter."""
    groups = adapter_groups(row_adapter, [a is not None for a in adapters])
    chosen = [adapters[a] for a, _, _ in groups.spans]
    factors = [t for a in chosen for t in (a.lora_A, a.lora_B)]
    scales = [a.scale for a in chosen]
    dropouts = [a.dropout_p for a in chosen]
    return GroupedLoraLinear.apply(x, weight, bias, groups, scales, dropouts, *factors)


def sorted_bags(layout: BagLayout, groups: AdapterGroups):
    """(ids [L_r], id_start [m_r + 1], weights [L_r] or None) of the routed bags in span order:
    bag k of that order pools ids[id_start[k]:id_start[k + 1]] (grouped: the bags from the first
    span's to the last's)."""
    ends = torch.cat([layout.offsets[1:], layout.offsets.new_tensor([layout.ids.numel()])])
    if not groups.spans:
        weights = layout.weights[:0] if layout.weights is not None else None
        return layout.ids[:0], layout.offsets.new_zeros(1), weights
    if groups.rows is None:  # the bags from the first span's to the last's: one run of ids, sliced
        first, last = groups.spans[0][1], groups.spans[-1][2]
        lo, hi = int(layout.offsets[first]), int(ends[last - 1])
        id_start = torch.cat([layout.offsets[first:last], ends[last - 1 : last]]) - lo
        weights = layout.weights[lo:hi] if layout.weights is not None else None
        return layout.ids[lo:hi], id_start, weights
    lengths = ends - layout.offsets
    starts, lengths = layout.offsets.index_select(0, groups.rows), lengths.index_select(0, groups.rows)
    id_start = torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, 0)])
    # position of the k-th routed id: its bag's start in layout + its place within the bag
    positions = torch.repeat_interleave(starts - id_start[:-1], lengths) + torch.arange(
        int(id_start[-1]), device=lengths.device
    )
    weights = layout.weights.index_select(0, positions) if layout.weights is not None else None
    return layout.ids.index_select(0, positions), id_start, weights


class GroupedBagDelta(torch.autograd.Function):
    """δ [nb, D] of every bag (zero for bags without an adapter; module docstring), sparse
    gradients for every adapter's A (its span's ids only), dense for its B."""

    @staticmethod
    def forward(ctx, layout: BagLayout, groups: AdapterGroups, out_dim: int, dtype, scales, *factors):
        ids, id_start, weights = sorted_bags(layout, groups)
        grouped = groups.rows is None
        first = groups.spans[0][1] if grouped and groups.spans else 0
        delta = torch.zeros(layout.num_bags, out_dim, dtype=dtype, device=ids.device)
        out = delta if grouped else delta.new_empty(groups.routed, out_dim)
        pooled = []
        bounds = id_start.tolist()
        for (_, start, end), lora_A, lora_B, scale in zip(groups.spans, factors[0::2], factors[1::2], scales):
            s, e = start - first, end - first  # this span's bags in the sorted order
            lo, hi = bounds[s], bounds[e]
            w = weights[lo:hi] if weights is not None else None
            p = F.embedding_bag(ids[lo:hi], lora_A.detach(), id_start[s:e] - lo, mode="sum", per_sample_weights=w)
            out[start:end] = p.mm(lora_B.detach()).mul_(scale)
            pooled.append(p)
        if not grouped and groups.spans:
            delta.index_copy_(0, groups.rows, out)
        ctx.layout_ids, ctx.bounds, ctx.first = ids, bounds, first
        ctx.groups, ctx.scales = groups, scales
        ctx.table_shapes = [(a.shape, a.dtype) for a in factors[0::2]]
        ctx.save_for_backward(id_start, weights, *pooled, *factors[1::2])
        return delta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_delta):
        id_start, weights, *rest = ctx.saved_tensors
        groups, n = ctx.groups, len(ctx.groups.spans)
        pooled, lora_Bs = rest[:n], rest[n:]
        grouped = groups.rows is None
        g_all = grad_delta if grouped else grad_delta.index_select(0, groups.rows)
        lengths = torch.diff(id_start)
        grads = []
        for i, (_, start, end) in enumerate(groups.spans):
            s, e = start - ctx.first, end - ctx.first
            lo, hi = ctx.bounds[s], ctx.bounds[e]
            g = g_all[start:end]
            scale = ctx.scales[i]
            grad_a = grad_b = None
            if ctx.needs_input_grad[5 + 2 * i]:
                per_bag = F.linear(g.to(lora_Bs[i].dtype), lora_Bs[i]).mul_(scale)  # [m_a, r]: s·dδ_j·Bᵀ
                rows = per_bag.repeat_interleave(lengths[s:e], dim=0)  # one row per id
                if weights is not None:
                    rows.mul_(weights[lo:hi].unsqueeze(1))
                index = ctx.layout_ids[lo:hi].unsqueeze(0)
                shape, dtype = ctx.table_shapes[i]
                grad_a = torch.sparse_coo_tensor(index, rows.to(dtype), shape, check_invariants=False)
            if ctx.needs_input_grad[6 + 2 * i]:
                grad_b = pooled[i].t().mm(g.to(pooled[i].dtype)).mul_(scale)
            grads += [grad_a, grad_b]
        return None, None, None, None, None, *grads


def grouped_bag_delta(layout: BagLayout, adapters, bag_adapter, out_dim: int, dtype) -> torch.Tensor:
    """δ_j = s_a·(Σ w_i·A_a[i])·B_a with a = bag_adapter[j] (zero for −1 and absent adapters)."""
    groups = adapter_groups(bag_adapter, [a is not None for a in adapters])
    chosen = [adapters[a] for a, _, _ in groups.spans]
    factors = [t for a in chosen for t in (a.lora_A, a.lora_B)]
    return GroupedBagDelta.apply(layout, groups, out_dim, dtype, [a.scale for a in chosen], *factors)
