"""Segmented LoRA in Triton: many adapters in one batch, each row (or bag) through its own.

Notation (DESIGN.md, "Segmented LoRA"): n adapters; row i of the batch uses adapter a_i, or none
(a_i = −1). Their factors are stacked with the ranks padded to the largest, R = max_a r_a:
A_stack [n, R, K], B_stack [n, N, R] for a linear layer, A_stack [n, V, R] (or one A_a [V, r_a]
table per adapter, read where it lies) and B_stack [n, R, D] for a table; s [n] the scales.

**Linear**, x [M, K], W [N, K] frozen::

    u_i  = d_a(x_i)·A_aᵀ                               [R]   the shrink, a = a_i
    y_i  = x_i·Wᵀ + b + s_a·u_i·B_aᵀ                   [N]   the expand, onto the base output

Backward, given dY [M, N] (rows with a_i = −1 only pass dY·W)::

    v_i      = dY_i·B_a                                [R]
    dX_i     = dY_i·W + s_a·(v_i·A_a) ⊙ m_i             m = dropout's keep/(1 − p_a)
    dA_stack[a] = s_a·Σ_{i: a_i=a} v_iᵀ·d_a(x_i)       [R, K]   each adapter's own slice
    dB_stack[a] = s_a·Σ_{i: a_i=a} dY_iᵀ·u_i           [N, R]

**Embedding bag** (plain lookups are bags of one), bag j with ids I_j, weights w_i, adapter a_j::

    pooled_j = Σ_{i∈I_j} w_i·A_a[i]                    [R]   gathered from adapter a's table
    out_j    = base_j + s_a·pooled_j·B_a               [D]
    v_j      = dY_j·B_aᵀ                               [R]
    dB_stack[a] = s_a·Σ_{j: a_j=a} pooled_jᵀ·dY_j      [R, D]
    dA_a[i] += s_a·w_i·v_j     for the ids in the batch only: sparse COO, no dense V×r buffer

Padding: the zero rows of A and columns of B beyond r_a add exactly 0 to u, v and the outputs,
and their gradients are exactly 0 (dA's padded rows are s·vᵀ·x with v's padded lanes dY·0 = 0;
dB's padded columns are s·dYᵀ·u with u's padded lanes 0). What padding costs: every row pays
FLOPs and bytes for R = max r_a, not its own r_a (2·R·(K + N) multiply-adds per row instead of
2·r_a·(K + N); A and B reads of n·R·(K + N) elements), and tl.dot pads R further to
:func:`~recpeft.kernels.launch.padded_rank` (≥ 16, a power of two). Mixing r = 4 and r = 64
therefore runs every row at 64: group adapters of similar rank into one stack.

**Grouping, once per batch** (:func:`~recpeft.kernels.reference.segment_plan`): one stable
sort of the ids, group ends by binary search, then tiles of at most BLOCK_M rows of one adapter
each — Punica's SGMV layout. No loop over adapters and nothing read back to the host: the grid
has ``cdiv(M, BLOCK_M) + n`` tiles, an upper bound on the tiles the groups need, and the tiles
past the last carry adapter −1 and do nothing.

Kernels (the base GEMMs x·Wᵀ + b and dY·W stay torch's, i.e. cuBLAS):

- ``_segment_shrink_kernel``: one program per tile. u = d(src)·Pᵀ with P the tile's adapter's
  [R, C] factor: the forward's u (src = x, P = A_a, with dropout), the backward's v (src = dY,
  P = B_aᵀ); with OUTER it also accumulates s·srcᵀ·saved into the adapter's gradient slice from
  the same src tiles (dB, from the forward's u or the bag's pooled vectors).
- ``_segment_expand_kernel``: one program per tile × column tile. dst[rows] += s·u·Qᵀ (⊙ m) with
  Q the adapter's [C, R] factor: the forward's y += s·u·B_aᵀ, the backward's dX += s·(v·A_a) ⊙ m,
  the bag's out += s·pooled·B_a; with OUTER it accumulates s·uᵀ·d(x) into the adapter's slice
  (dA) from the x tile at the same position. Rows belong to one tile, columns to one column
  tile: dst needs no atomics.
- ``_segment_pool_kernel`` (bags): pooled_j for a run of sorted positions, gathering A_a's rows
  through a table of adapter addresses, so that a layer's per-adapter tables are read in place
  (stacking n tables of V rows per forward would copy n·V·R elements).

dA_stack and dB_stack are float32 sums over rows, added into with ``tl.atomic_add`` (the order,
hence the last bits, can change from run to run), then cast to the factors' dtype. Products
accumulate in float32; tl.dot operands are in the input dtype (fp32 as IEEE fp32 unless torch
allows TF32). The dropout mask is the linear op's: keep_ij = philox(seed, (j, i)) ≥ p_a for row i
and column j (:mod:`recpeft.kernels.lora_linear`), regenerated in backward from the seed.
float64 inputs run the reference ops.

Sources: Punica (Chen et al., 2023) and S-LoRA (Sheng et al., 2023) for the shrink/expand split
over segments; DESIGN.md for the math; Triton tutorial 03 for the tiles.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import lora_embedding_bag as bag_ops
from . import reference
from .bags import BagLayout
from .failures import naming_kernel_failures
from .launch import DOT_MIN, INTERPRETING, padded_rank

# The linear op's float32-accumulating dot (bf16 upcast under the interpreter), its fp32 dot
# precision rule and its dropout mask: shared, so that both ops compute and mask alike.
from .lora_linear import _dot, _dot_precision, _keep_scale, draw_dropout_seed
from .reference import RoutedStack, SegmentPlan, check_stacked, padded_stack, routed_stack, segment_plan

# ---------------------------------------------------------------------------------------------
# Launch settings
# ---------------------------------------------------------------------------------------------

# Rows per tile: the tile's tl.dot M dimension. A group fills ⌈count/BLOCK_M⌉ tiles, the last one
# partly, so BLOCK_M follows the mean rows per adapter (M/n) between DOT_MIN and this; at 64
# adapters and M = 8192 (128 rows each) it is 2 tiles per adapter. 16-bit operands: no variant
# spills at 64 rows up to R_PAD = 128 (kernels/aot.py full matrix, sm_90). float32 (IEEE dots on
# the FMA units, operands in registers) spills once BLOCK_M·R_PAD > FP32_TILE_ELEMENTS: measured
# no spills at (BLOCK_M, R_PAD) = (64, 16), (32, 32), (16, 64); 344 B at (32, 64), 148 B at
# (64, 32). At R_PAD = 128 the 16-row floor leaves one spilling variant (the dropout backward's
# expand, 148 B). Tile sizes are first estimates, not yet timed on a GPU.
MAX_BLOCK_M = 64
FP32_TILE_ELEMENTS = 1024
# Columns per loop step of the shrink and per program of the expand: 64 fp32 columns of a
# 64-row tile are 16 KB per operand per stage.
BLOCK_C = 64
# Padded rank from which a tile's programs use 8 warps: u, the dst tile and the outer product
# [R_PAD, BLOCK_C] are then held by twice the threads (fewer registers each). float32 takes 8
# warps at every rank: its IEEE tl.dot runs on the FMA units from registers, and at 4 warps the
# expand kernel of the backward (dX tile and dA outer product) needs 255 registers and spills
# (kernels/aot.py, sm_90, BLOCK_M = 64, R_PAD = 16).
WIDE_RANK = 64
NUM_WARPS, NUM_WARPS_WIDE_RANK = 4, 8
NUM_STAGES = 3
# Under the interpreter every tile is DOT_MIN wide, so the tests' small matrices span several
# tiles (and several tiles per adapter group).
INTERPRETER_BLOCK = DOT_MIN
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchSettings:
    """Tiles of the shrink and expand kernels for one call (powers of two)."""

    block_m: int  # rows per tile (the plan's tile)
    block_c: int  # columns per shrink step / per expand program
    r_pad: int  # R padded for tl.dot (padded_rank)
    num_warps: int


def launch_settings(rows: int, num_adapters: int, rank: int, dtype: torch.dtype) -> LaunchSettings:
    """One heuristic for every launch of the op: BLOCK_M from the mean rows per adapter (a
    group's last tile is partly empty, so small groups take small tiles) and, for float32, the
    rank (see MAX_BLOCK_M); R padded to ≥ 16; the warps by rank and dtype (see WIDE_RANK)."""
    r_pad = padded_rank(rank)
    wide = r_pad >= WIDE_RANK or dtype == torch.float32
    num_warps = NUM_WARPS_WIDE_RANK if wide else NUM_WARPS
    if INTERPRETING:
        return LaunchSettings(INTERPRETER_BLOCK, INTERPRETER_BLOCK, r_pad, num_warps)
    mean_rows = triton.cdiv(max(rows, 1), max(num_adapters, 1))
    largest = MAX_BLOCK_M if dtype != torch.float32 else min(MAX_BLOCK_M, FP32_TILE_ELEMENTS // r_pad)
    block_m = max(DOT_MIN, min(largest, triton.next_power_of_2(mean_rows)))
    return LaunchSettings(block_m, BLOCK_C, r_pad, num_warps)


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M: tl.constexpr):
    """(adapter ≥ 0 or −1, its int64 index clamped to ≥ 0, sorted positions, their rows, which
    positions hold a row) of this program's tile."""
    tile = tl.program_id(0)
    adapter = tl.load(tile_adapter_ptr + tile)
    start = tl.load(tile_start_ptr + tile)
    end = tl.load(tile_end_ptr + tile)
    pos = start + tl.arange(0, BLOCK_M)
    pos_ok = pos < end  # a tile past the last has start = end = 0
    rows = tl.load(order_ptr + pos, mask=pos_ok, other=0).to(tl.int64)
    return adapter, tl.maximum(adapter, 0).to(tl.int64), pos, rows, pos_ok


@triton.jit(do_not_specialize=["seed"])
def _segment_shrink_kernel(
    # pointers: inputs
    src_ptr,  # [M, C] x (forward) or dY (backward); tile rows gathered through order
    proj_ptr,  # [n, R, C] (strided) A_stack (forward) or B_stackᵀ (backward)
    scales_ptr,  # [n] float32 s_a (OUTER)
    p_ptr,  # [n] float32 dropout p_a (DROPOUT)
    order_ptr,  # [M] int64 rows sorted by adapter
    tile_adapter_ptr,  # [T] int32 the plan (reference.SegmentPlan)
    tile_start_ptr,  # [T] int64
    tile_end_ptr,  # [T] int64
    saved_ptr,  # [M, R] float32 at sorted positions: the forward's u, or pooled (OUTER)
    # pointers: outputs
    out_ptr,  # [M, R] float32 at sorted positions: u or v
    grad_ptr,  # [n, C, R] (strided) float32 accumulator, zero on entry (OUTER): dB
    # sizes and scalars
    C,
    R,
    seed,
    # strides (elements)
    stride_sm,
    stride_sc,
    stride_pn,
    stride_pr,
    stride_pc,
    stride_gn,
    stride_gc,
    stride_gr,
    # modes
    DROPOUT: tl.constexpr,  # d(src) = src ⊙ m (the forward's shrink of x)
    OUTER: tl.constexpr,  # also grad[a] += s·srcᵀ·saved
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """out[pos] = d(src[rows])·P_aᵀ for the tile's rows, over C in BLOCK_C steps; with OUTER the
    same src tiles give grad[a][cols] += s_a·src_tileᵀ·saved[pos]."""
    adapter, a, pos, rows, pos_ok = _tile(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    rank_ok = ranks < R
    dtype = src_ptr.dtype.element_ty
    c_end = tl.where(adapter >= 0, C, 0)  # a tile without rows runs no step
    if DROPOUT:
        p = tl.load(p_ptr + a)
    if OUTER:
        saved = tl.load(
            saved_ptr + pos[:, None] * R + ranks[None, :], mask=pos_ok[:, None] & rank_ok[None, :], other=0.0
        )
        s_saved = (saved * tl.load(scales_ptr + a)).to(dtype)  # s·u [BLOCK_M, R_PAD]
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for c0 in range(0, c_end, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        src = tl.load(
            src_ptr + rows[:, None] * stride_sm + cols[None, :] * stride_sc,
            mask=pos_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            src = (src.to(tl.float32) * _keep_scale(seed, rows, cols, p)).to(dtype)
        proj_t = tl.load(
            proj_ptr + a * stride_pn + cols[:, None] * stride_pc + ranks[None, :] * stride_pr,
            mask=col_ok[:, None] & rank_ok[None, :],
            other=0.0,
        )  # P_aᵀ [BLOCK_C, R_PAD]
        acc = _dot(src, proj_t, acc, DOT_PRECISION)
        if OUTER:
            part = _dot(tl.trans(src), s_saved, None, DOT_PRECISION)  # [BLOCK_C, R_PAD]
            tl.atomic_add(
                grad_ptr + a * stride_gn + cols[:, None] * stride_gc + ranks[None, :] * stride_gr,
                part,
                mask=col_ok[:, None] & rank_ok[None, :],
            )
    tl.store(out_ptr + pos[:, None] * R + ranks[None, :], acc, mask=pos_ok[:, None] & rank_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def _segment_expand_kernel(
    # pointers: inputs
    u_ptr,  # [M, R] float32 at sorted positions: u (forward), v (backward), pooled (bags)
    proj_ptr,  # [n, C, R] (strided) B_stack (forward), A_stackᵀ (backward), B_stackᵀ (bags)
    scales_ptr,  # [n] float32 s_a
    p_ptr,  # [n] float32 dropout p_a (DROPOUT)
    order_ptr,  # [M] int64 rows sorted by adapter
    tile_adapter_ptr,  # [T] int32 the plan
    tile_start_ptr,  # [T] int64
    tile_end_ptr,  # [T] int64
    outer_ptr,  # [M, C] x (OUTER)
    # pointers: outputs
    dst_ptr,  # [M, C] updated in place at the tile's rows (ADD_DST)
    grad_ptr,  # [n, R, C] (strided) float32 accumulator, zero on entry (OUTER): dA
    # sizes and scalars
    C,
    R,
    seed,
    # strides (elements)
    stride_pn,
    stride_pc,
    stride_pr,
    stride_dm,
    stride_om,
    stride_oc,
    stride_gn,
    stride_gr,
    stride_gc,
    # modes
    ADD_DST: tl.constexpr,  # dst += s·u·Qᵀ (off: a backward that needs no dX)
    DROPOUT: tl.constexpr,  # the backward's mask on the dX term and on x for dA
    OUTER: tl.constexpr,  # grad[a] += s·uᵀ·d(outer)
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    # tiles
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """dst[rows, cols] += s_a·u[pos]·Q_a[cols]ᵀ (⊙ m) for the tile's rows and this program's
    columns; with OUTER grad[a][:, cols] += s_a·u[pos]ᵀ·d(outer[rows, cols])."""
    adapter, a, pos, rows, pos_ok = _tile(order_ptr, tile_adapter_ptr, tile_start_ptr, tile_end_ptr, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ranks = tl.arange(0, R_PAD)
    col_ok = cols < tl.where(adapter >= 0, C, 0)  # a tile without rows writes and adds nothing
    rank_ok = ranks < R
    tile_ok = pos_ok[:, None] & col_ok[None, :]
    dtype = proj_ptr.dtype.element_ty
    u = tl.load(u_ptr + pos[:, None] * R + ranks[None, :], mask=pos_ok[:, None] & rank_ok[None, :], other=0.0)
    su = (u * tl.load(scales_ptr + a)).to(dtype)  # s·u [BLOCK_M, R_PAD]
    if DROPOUT:
        keep = _keep_scale(seed, rows, cols, tl.load(p_ptr + a))
    if ADD_DST:
        proj_t = tl.load(
            proj_ptr + a * stride_pn + ranks[:, None] * stride_pr + cols[None, :] * stride_pc,
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )  # Q_aᵀ [R_PAD, BLOCK_C]
        delta = _dot(su, proj_t, None, DOT_PRECISION)
        if DROPOUT:
            delta = delta * keep
        dst = dst_ptr + rows[:, None] * stride_dm + cols[None, :]
        total = tl.load(dst, mask=tile_ok, other=0.0).to(tl.float32) + delta
        tl.store(dst, total.to(dst_ptr.dtype.element_ty), mask=tile_ok)
    if OUTER:
        src = tl.load(outer_ptr + rows[:, None] * stride_om + cols[None, :] * stride_oc, mask=tile_ok, other=0.0)
        if DROPOUT:
            src = (src.to(tl.float32) * keep).to(dtype)
        part = _dot(tl.trans(su), src, None, DOT_PRECISION)  # [R_PAD, BLOCK_C]
        tl.atomic_add(
            grad_ptr + a * stride_gn + ranks[:, None] * stride_gr + cols[None, :] * stride_gc,
            part,
            mask=rank_ok[:, None] & col_ok[None, :],
        )


@triton.jit
def _segment_pool_kernel(
    # pointers
    table_addr_ptr,  # [n] int64 address of adapter a's A table (row-major, unit column stride)
    table_stride_ptr,  # [n] int64 its row stride (elements)
    rank_ptr,  # [n] int32 its rank r_a: lanes r_a..R stay 0 (else the next row, or past the table's end)
    like_ptr,  # any tensor of the tables' dtype (the element type of the addresses)
    ids_ptr,  # [L] ids, grouped by bag
    offsets_ptr,  # [nb] start of each bag in ids
    weights_ptr,  # [L] w_i (HAS_WEIGHTS)
    bag_adapter_ptr,  # [nb] adapter of each bag (−1: none)
    order_ptr,  # [nb] int64 bags sorted by adapter
    pooled_ptr,  # [nb, R] float32 out, at sorted positions (0 for bags without adapter)
    # sizes
    num_bags,
    num_ids,
    num_adapters,
    R,
    bags_per_program,
    # meta-parameters
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    """pooled[pos] = Σ_{i∈I_j} w_i·A_a[ids_i] for bag j = order[pos], a = its adapter, for a run of
    ``bags_per_program`` sorted positions; BLOCK_L ids gathered per step."""
    first = tl.program_id(0).to(tl.int64) * bags_per_program
    ranks = tl.arange(0, BLOCK_R)
    element = like_ptr.dtype.element_ty
    for pos in range(first, tl.minimum(first + bags_per_program, num_bags)):
        bag = tl.load(order_ptr + pos)
        adapter = tl.load(bag_adapter_ptr + bag).to(tl.int64)
        routed = (adapter >= 0) & (adapter < num_adapters)
        a = tl.where(routed, adapter, 0)
        table = tl.load(table_addr_ptr + a).to(tl.pointer_type(element))
        row_stride = tl.load(table_stride_ptr + a)
        lane_ok = ranks < tl.load(rank_ptr + a)
        start = tl.load(offsets_ptr + bag).to(tl.int64)
        end = tl.load(offsets_ptr + bag + 1, mask=bag + 1 < num_bags, other=num_ids).to(tl.int64)
        end = tl.where(routed, end, start)  # a bag without adapter pools nothing
        pooled = tl.zeros([BLOCK_R], dtype=tl.float32)
        for first_id in range(start, end, BLOCK_L):
            at = first_id + tl.arange(0, BLOCK_L)
            in_bag = at < end
            ids = tl.load(ids_ptr + at, mask=in_bag, other=0).to(tl.int64)
            rows = tl.load(
                table + ids[:, None] * row_stride + ranks[None, :], mask=in_bag[:, None] & lane_ok[None, :], other=0.0
            ).to(tl.float32)
            if HAS_WEIGHTS:
                rows = rows * tl.load(weights_ptr + at, mask=in_bag, other=0.0).to(tl.float32)[:, None]
            pooled += tl.sum(rows, axis=0)
        tl.store(pooled_ptr + pos * R + ranks, pooled, mask=ranks < R)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _plan_args(plan: SegmentPlan) -> dict:
    return {
        "order_ptr": plan.order,
        "tile_adapter_ptr": plan.tile_adapter,
        "tile_start_ptr": plan.tile_start,
        "tile_end_ptr": plan.tile_end,
    }


def _shrink(src, proj, proj_strides, scales, plan, cfg, out, *, dropout_p=None, seed=0, saved=None, grad=None):
    """Launch the shrink: out = d(src)·P_aᵀ per tile, P_a [R, C] at ``proj`` with (adapter, rank,
    column) strides ``proj_strides``; with ``grad`` ([n, C, R] float32, any strides) also
    grad[a] += s·srcᵀ·saved. Unread pointers get ``scales`` (a float32 tensor)."""
    grad_strides = grad.stride() if grad is not None else (0, 0, 0)
    _segment_shrink_kernel[(plan.num_tiles,)](
        src_ptr=src,
        proj_ptr=proj,
        scales_ptr=scales,
        p_ptr=dropout_p if dropout_p is not None else scales,
        saved_ptr=saved if saved is not None else scales,
        out_ptr=out,
        grad_ptr=grad if grad is not None else scales,
        C=src.shape[1],
        R=out.shape[1],
        seed=seed,
        stride_sm=src.stride(0),
        stride_sc=src.stride(1),
        stride_pn=proj_strides[0],
        stride_pr=proj_strides[1],
        stride_pc=proj_strides[2],
        stride_gn=grad_strides[0],
        stride_gc=grad_strides[1],
        stride_gr=grad_strides[2],
        DROPOUT=dropout_p is not None,
        OUTER=grad is not None,
        DOT_PRECISION=_dot_precision(src.dtype),
        R_PAD=cfg.r_pad,
        BLOCK_M=plan.block_m,
        BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps,
        num_stages=NUM_STAGES,
        **_plan_args(plan),
    )


def _expand(u, proj, proj_strides, scales, plan, cfg, dst, *, cols, dropout_p=None, seed=0, outer=None, grad=None):
    """Launch the expand over ``cols`` columns: dst[rows] += s·u·Q_aᵀ (⊙ m) per tile, Q_a [C, R] at
    ``proj`` with (adapter, column, rank) strides ``proj_strides`` (dst None: no update); with
    ``grad`` ([n, R, C] float32) also grad[a] += s·uᵀ·d(outer)."""
    grad_strides = grad.stride() if grad is not None else (0, 0, 0)
    placeholder = u
    _segment_expand_kernel[(plan.num_tiles, triton.cdiv(cols, cfg.block_c))](
        u_ptr=u,
        proj_ptr=proj,
        scales_ptr=scales,
        p_ptr=dropout_p if dropout_p is not None else scales,
        outer_ptr=outer if outer is not None else proj,
        dst_ptr=dst if dst is not None else placeholder,
        grad_ptr=grad if grad is not None else placeholder,
        C=cols,
        R=u.shape[1],
        seed=seed,
        stride_pn=proj_strides[0],
        stride_pc=proj_strides[1],
        stride_pr=proj_strides[2],
        stride_dm=dst.stride(0) if dst is not None else 0,
        stride_om=outer.stride(0) if outer is not None else 0,
        stride_oc=outer.stride(1) if outer is not None else 0,
        stride_gn=grad_strides[0],
        stride_gr=grad_strides[1],
        stride_gc=grad_strides[2],
        ADD_DST=dst is not None,
        DROPOUT=dropout_p is not None,
        OUTER=grad is not None,
        DOT_PRECISION=_dot_precision(proj.dtype),
        R_PAD=cfg.r_pad,
        BLOCK_M=plan.block_m,
        BLOCK_C=cfg.block_c,
        num_warps=cfg.num_warps,
        num_stages=NUM_STAGES,
        **_plan_args(plan),
    )


def _check_linear(x, weight, bias, lora_A, lora_B, scales, row_adapter, dropout_p) -> tuple[int, int, int, int, int]:
    """(M, K, N, n, R) after the shapes, dtypes and devices of the stacked linear op."""
    name = "segmented_lora_linear_stacked"
    if x.dim() != 2:
        raise ValueError(f"{name}: x must be [M, K], got {tuple(x.shape)}")
    m, k = x.shape
    n_out = weight.shape[0]
    n = check_stacked(lora_A, lora_B, scales, row_adapter, a_shape=(-1, -1, k), b_shape=(-1, n_out, -1), name=name)
    rank = lora_A.shape[1]
    expected = {"weight": (weight, (n_out, k)), "lora_B": (lora_B, (n, n_out, rank))}
    if bias is not None:
        expected["bias"] = (bias, (n_out,))
    for label, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: {label} has shape {tuple(tensor.shape)}, expected {shape}")
    for label, tensor in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B), ("bias", bias)):
        if tensor is not None and (tensor.dtype != x.dtype or tensor.device != x.device):
            raise TypeError(f"{name}: {label} is {tensor.dtype} on {tensor.device}; x is {x.dtype} on {x.device}")
    if x.dtype not in _TRITON_DTYPES:
        raise TypeError(f"{name}: x must be float32, bfloat16 or float16 here, got {x.dtype}")
    if row_adapter.numel() != m:
        raise ValueError(f"{name}: {row_adapter.numel()} row adapter ids for {m} rows")
    if dropout_p is not None and tuple(dropout_p.shape) != (n,):
        raise ValueError(f"{name}: dropout_p must be [{n}], got {tuple(dropout_p.shape)}")
    return m, k, n_out, n, rank


def segmented_lora_linear_forward(x, weight, bias, lora_A, lora_B, scales, plan, cfg, dropout_p=None, seed=0):
    """(y [M, N], u [M, R] float32 at the plan's sorted positions) of the linear op (module
    docstring); x [M, K], lora_A [n, R, K], lora_B [n, N, R], scales / dropout_p [n] float32."""
    y = F.linear(x, weight, bias)  # the base GEMM, torch's
    u = torch.empty(x.shape[0], lora_A.shape[1], dtype=torch.float32, device=x.device)
    if x.shape[0] and plan.num_tiles:
        _shrink(x, lora_A, lora_A.stride(), scales, plan, cfg, u, dropout_p=dropout_p, seed=seed)
        _expand(u, lora_B, lora_B.stride(), scales, plan, cfg, y, cols=y.shape[1])
    return y, u


def segmented_lora_linear_backward(
    grad_y, x, u, weight, lora_A, lora_B, scales, plan, cfg, dropout_p=None, seed=0, need_x=True
):
    """(dX [M, K] or None, dA_stack [n, R, K] float32, dB_stack [n, N, R] float32) for dY [M, N]
    and the forward's x and u."""
    n, rank, k = lora_A.shape
    grad_a = torch.zeros(n, rank, k, dtype=torch.float32, device=x.device)
    grad_b = torch.zeros(n, lora_B.shape[1], rank, dtype=torch.float32, device=x.device)
    grad_x = grad_y @ weight if need_x else None  # the base part, torch's GEMM
    if x.shape[0] == 0 or plan.num_tiles == 0:
        return grad_x, grad_a, grad_b
    v = torch.empty_like(u)
    sn, s_out, sr = lora_B.stride()  # B_stack [n, N, R] read as Bᵀ [n, R, N]
    _shrink(grad_y, lora_B, (sn, sr, s_out), scales, plan, cfg, v, saved=u, grad=grad_b)
    an, ar, ak = lora_A.stride()  # A_stack [n, R, K] read as Aᵀ [n, K, R]
    _expand(
        v,
        lora_A,
        (an, ak, ar),
        scales,
        plan,
        cfg,
        grad_x,
        cols=k,
        dropout_p=dropout_p,
        seed=seed,
        outer=x,
        grad=grad_a,
    )
    return grad_x, grad_a, grad_b


@dataclass(frozen=True)
class TableRefs:
    """Where the pool kernel finds each adapter's A table: [n] int64 addresses, row strides and
    ranks on the device, and one table (for its dtype)."""

    addresses: torch.Tensor
    row_strides: torch.Tensor
    ranks: torch.Tensor
    like: torch.Tensor


def table_refs(tables: list[torch.Tensor], stacked: bool) -> TableRefs:
    """:class:`TableRefs` of one A_stack [n, V, R] (``stacked``) or of one [V, r_a] table per
    adapter; every table needs a unit column stride."""
    first = tables[0]
    device = first.device
    if stacked:
        n, _, rank = first.shape
        step = first.stride(0) * first.element_size()
        addresses = first.data_ptr() + step * torch.arange(n, dtype=torch.int64, device=device)
        strides = torch.full((n,), first.stride(1), dtype=torch.int64, device=device)
        ranks = torch.full((n,), rank, dtype=torch.int32, device=device)
        return TableRefs(addresses, strides, ranks, first)
    as_tensor = lambda values, dtype: torch.tensor(values, dtype=dtype).to(device, non_blocking=True)  # noqa: E731
    return TableRefs(
        as_tensor([t.data_ptr() for t in tables], torch.int64),
        as_tensor([t.stride(0) for t in tables], torch.int64),
        as_tensor([t.shape[1] for t in tables], torch.int32),
        first,
    )


def segmented_lora_bag_forward(refs: TableRefs, lora_B, scales, layout: BagLayout, bag_adapter, plan, cfg, out):
    """out (updated in place: base + delta) and pooled [nb, R] float32 at the plan's sorted
    positions; lora_B [n, R, D]."""
    num_bags, rank, dim = layout.num_bags, lora_B.shape[1], lora_B.shape[2]
    pooled = torch.empty(num_bags, rank, dtype=torch.float32, device=out.device)
    if num_bags == 0:
        return out, pooled
    bag_cfg = bag_ops.launch_settings(dim, rank, layout.ids.numel(), num_bags)
    weights = layout.weights
    _segment_pool_kernel[(triton.cdiv(num_bags, bag_cfg.bags_per_program),)](
        refs.addresses,
        refs.row_strides,
        refs.ranks,
        refs.like,
        layout.ids,
        layout.offsets,
        weights if weights is not None else layout.ids,
        bag_adapter,
        plan.order,
        pooled,
        num_bags,
        layout.ids.numel(),
        lora_B.shape[0],
        rank,
        bag_cfg.bags_per_program,
        HAS_WEIGHTS=weights is not None,
        BLOCK_L=bag_cfg.block_l,
        BLOCK_R=bag_cfg.block_r,
    )
    if plan.num_tiles:
        bn, br, bd = lora_B.stride()  # B_stack [n, R, D] read as Bᵀ [n, D, R]
        _expand(pooled, lora_B, (bn, bd, br), scales, plan, cfg, out, cols=dim)
    return out, pooled


def segmented_lora_bag_backward(grad_out, pooled, lora_B, scales, plan, cfg):
    """(v [nb, R] float32 at sorted positions, v_j = dY_j·B_aᵀ; dB_stack [n, R, D] float32)."""
    n, rank, dim = lora_B.shape
    grad_b = torch.zeros(n, rank, dim, dtype=torch.float32, device=grad_out.device)
    v = torch.empty_like(pooled)
    if grad_out.shape[0] and plan.num_tiles:
        # dB_stack [n, R, D] accumulated as [n, D, R]: dB[a]ᵀ += s·dYᵀ·pooled
        _shrink(grad_out, lora_B, lora_B.stride(), scales, plan, cfg, v, saved=pooled, grad=grad_b.transpose(1, 2))
    return v, grad_b


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _rows_with_adapter(row_adapter, num_adapters) -> list[int]:
    """Rows (or bags) per stacked adapter, on the host (one device-to-host copy, in backward)."""
    routed = row_adapter[(row_adapter >= 0) & (row_adapter < num_adapters)].to(torch.int64)
    return torch.bincount(routed, minlength=num_adapters).tolist()


def _as_factors(factors, ranks, rank_dim_a, rank_dim_b):
    """(A_stack, B_stack) from ``factors``: the two stacks as given (``ranks`` None) or the n A's
    then the n B's, zero-padded to the largest rank and stacked (no autograd through the copy:
    the Function hands each adapter its own slice of the gradient)."""
    if ranks is None:
        return factors
    n, rank = len(ranks), max(ranks)
    return padded_stack(list(factors[:n]), rank, rank_dim_a), padded_stack(list(factors[n:]), rank, rank_dim_b)


def _factor_grads(grad_stack, ranks, used, rank_dim, dtype):
    """The gradient of the stacked factor, cast to ``dtype``: as one tensor (``ranks`` None) or
    adapter a's unpadded slice, None for an adapter without rows (as autograd gives an adapter
    absent from the batch on the torch path)."""
    if ranks is None:
        return (grad_stack.to(dtype),)
    return tuple(grad_stack[a].narrow(rank_dim, 0, r).to(dtype) if used[a] else None for a, r in enumerate(ranks))


class SegmentedLoraLinearFunction(torch.autograd.Function):
    """y_i = x_i·Wᵀ + b + s_a·(d_a(x_i)·A_aᵀ)·B_aᵀ (module docstring). ``factors``: (A_stack,
    B_stack) with ``ranks`` None, or the n A's [r_a, K] then the n B's [N, r_a] with their ranks.
    Saves x, u (float32 [M, R]), W, the stacks and the plan; never an M×N tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, scales, row_adapter, dropout_p, seed: int, ranks, *factors):
        lora_A, lora_B = _as_factors(factors, ranks, 0, 1)
        n, rank = lora_A.shape[:2]
        cfg = launch_settings(x.shape[0], n, rank, x.dtype)
        plan = segment_plan(row_adapter, n, cfg.block_m)
        y, u = segmented_lora_linear_forward(x, weight, bias, lora_A, lora_B, scales, plan, cfg, dropout_p, seed)
        ctx.save_for_backward(x, u, weight, lora_A, lora_B, scales, row_adapter, dropout_p, *_plan_tensors(plan))
        ctx.seed, ctx.ranks, ctx.cfg, ctx.block_m = seed, ranks, cfg, plan.block_m
        ctx.factor_dtypes = [f.dtype for f in factors]
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, u, weight, lora_A, lora_B, scales, row_adapter, dropout_p, *plan = ctx.saved_tensors
        plan = SegmentPlan(*plan, ctx.block_m)
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        g = grad_y if grad_y.stride(-1) == 1 else grad_y.contiguous()
        with naming_kernel_failures("segmented_lora_linear backward", (g, x, weight, lora_A, lora_B, row_adapter)):
            grad_x, grad_a, grad_b = segmented_lora_linear_backward(
                g, x, u, weight, lora_A, lora_B, scales, plan, ctx.cfg, dropout_p, ctx.seed, need_x
            )
        ranks = ctx.ranks
        used = _rows_with_adapter(row_adapter, lora_A.shape[0]) if ranks is not None else None
        dtype = lora_A.dtype
        grads_a = _factor_grads(grad_a, ranks, used, 0, dtype)
        grads_b = _factor_grads(grad_b, ranks, used, 1, dtype)
        grad_w = g.t() @ x if need_w else None  # only when a user unfroze W
        grad_bias = g.sum(0) if need_bias else None
        return (grad_x, grad_w, grad_bias, None, None, None, None, None, *grads_a, *grads_b)


def _plan_tensors(plan: SegmentPlan) -> tuple:
    return plan.order, plan.tile_adapter, plan.tile_start, plan.tile_end


class SegmentedLoraBagFunction(torch.autograd.Function):
    """out_j = base_j + s_a·(Σ w_i·A_a[i])·B_a (module docstring). ``factors``: (A_stack [n, V, R],
    B_stack [n, R, D]) with ``ranks`` None, or the n tables [V, r_a] then the n B's [r_a, D].
    Sparse gradient for the tables, dense for B, identity for base."""

    @staticmethod
    def forward(ctx, base, scales, bag_adapter, ids, bag_of_id, offsets, weights, ranks, *factors):
        stacked = ranks is None
        n = factors[0].shape[0] if stacked else len(ranks)
        tables = [factors[0]] if stacked else list(factors[:n])
        lora_B = factors[1] if stacked else padded_stack(list(factors[n:]), max(ranks), 0)
        rank = lora_B.shape[1]
        layout = BagLayout(ids, bag_of_id, offsets, weights, bag_adapter.numel())
        cfg = launch_settings(layout.num_bags, n, rank, lora_B.dtype)
        plan = segment_plan(bag_adapter, n, cfg.block_m)
        out = base.clone(memory_format=torch.contiguous_format)  # the kernel adds into rows of unit stride
        out, pooled = segmented_lora_bag_forward(
            table_refs(tables, stacked), lora_B, scales, layout, bag_adapter, plan, cfg, out
        )
        ctx.save_for_backward(pooled, lora_B, scales, bag_adapter, ids, bag_of_id, weights, *_plan_tensors(plan))
        ctx.ranks, ctx.cfg, ctx.block_m = ranks, cfg, plan.block_m
        ctx.table_shapes = [tuple(t.shape) for t in tables]
        ctx.table_dtype = tables[0].dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pooled, lora_B, scales, bag_adapter, ids, bag_of_id, weights, *plan = ctx.saved_tensors
        plan = SegmentPlan(*plan, ctx.block_m)
        n = lora_B.shape[0]
        grad_out = grad_out.contiguous()
        with naming_kernel_failures("segmented_lora_bag backward", (grad_out, pooled, lora_B, bag_adapter)):
            v, grad_b = segmented_lora_bag_backward(grad_out, pooled, lora_B, scales, plan, ctx.cfg)
        # dA_a[i] += s_a·w_i·v_j for every id i of a routed bag j (v is at sorted positions)
        position = torch.empty_like(plan.order)
        position[plan.order] = torch.arange(plan.order.numel(), device=position.device)
        adapter_of_id = bag_adapter.to(torch.int64).index_select(0, bag_of_id)
        kept = ((adapter_of_id >= 0) & (adapter_of_id < n)).nonzero().squeeze(1)
        adapter_kept = adapter_of_id.index_select(0, kept)
        values = v.index_select(0, position.index_select(0, bag_of_id.index_select(0, kept)))
        values = values * scales.index_select(0, adapter_kept)[:, None]
        if weights is not None:
            values = values * weights.index_select(0, kept).to(torch.float32)[:, None]
        values = values.to(ctx.table_dtype)
        ids_kept = ids.index_select(0, kept)
        ranks = ctx.ranks
        if ranks is None:
            indices = torch.stack([adapter_kept, ids_kept])
            grads_a = (torch.sparse_coo_tensor(indices, values, ctx.table_shapes[0], check_invariants=False),)
        else:
            grads_a = _sparse_per_table(adapter_kept, ids_kept, values, ranks, ctx.table_shapes)
        used = _rows_with_adapter(bag_adapter, n) if ranks is not None else None
        grads_b = _factor_grads(grad_b, ranks, used, 0, lora_B.dtype)
        return (grad_out, None, None, None, None, None, None, None, *grads_a, *grads_b)


def _sparse_per_table(adapter_kept, ids_kept, values, ranks, shapes) -> tuple:
    """One sparse COO gradient per table (its ids' rows, its r_a lanes), None for a table no bag
    used: the rows sorted by adapter once and split by the counts."""
    order = torch.argsort(adapter_kept, stable=True)
    counts = torch.bincount(adapter_kept, minlength=len(ranks)).tolist()
    id_groups = torch.split(ids_kept.index_select(0, order), counts)
    value_groups = torch.split(values.index_select(0, order), counts)
    return tuple(
        torch.sparse_coo_tensor(i.unsqueeze(0), v[:, :r], shape, check_invariants=False) if c else None
        for i, v, r, shape, c in zip(id_groups, value_groups, ranks, shapes, counts)
    )


# ---------------------------------------------------------------------------------------------
# The ops (dispatch's entry points)
# ---------------------------------------------------------------------------------------------


def _float64(*tensors) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in tensors)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def segmented_lora_linear_stacked(x, weight, bias, lora_A, lora_B, scales, row_adapter, dropout_p=None):
    """y_i = x_i·Wᵀ + b + s_a·(d_a(x_i)·A_aᵀ)·B_aᵀ with a = row_adapter[i] (−1: none), as
    :func:`recpeft.kernels.reference.segmented_lora_linear_stacked`: x [M, K], lora_A [n, R, K],
    lora_B [n, N, R], scales [n], dropout_p [n] or None. Ids outside [−1, n) are not checked
    here (one device-to-host copy would be): such rows get no adapter. float64 runs the
    reference op."""
    if _float64(x, weight, bias, lora_A, lora_B):
        return reference.segmented_lora_linear_stacked(x, weight, bias, lora_A, lora_B, scales, row_adapter, dropout_p)
    _check_linear(x, weight, bias, lora_A, lora_B, scales, row_adapter, dropout_p)
    return _apply_linear(x, weight, bias, scales, row_adapter, dropout_p, None, lora_A, lora_B)


def _apply_linear(x, weight, bias, scales, row_adapter, dropout_p, ranks, *factors):
    seed = draw_dropout_seed() if dropout_p is not None else 0
    scales = scales.to(device=x.device, dtype=torch.float32)
    dropout_p = dropout_p.to(device=x.device, dtype=torch.float32) if dropout_p is not None else None
    return SegmentedLoraLinearFunction.apply(
        _rows(x), weight, bias, scales, row_adapter.to(x.device), dropout_p, seed, ranks, *factors
    )


def segmented_lora_linear(x, weight, bias, adapters: list[reference.AdapterWeights | None], row_adapter):
    """The layers' form of :func:`segmented_lora_linear_stacked`: one :class:`AdapterWeights`
    (or None) per routed adapter, as :func:`recpeft.kernels.reference.segmented_lora_linear`.
    The adapters that exist are stacked, padded to the largest rank, inside the op; each gets
    the gradient of its own slice (None when no row used it, as on the torch path)."""
    weights = [a for a in adapters if a is not None]
    if _float64(x, weight, bias, *(t for a in weights for t in (a.lora_A, a.lora_B))):
        return reference.segmented_lora_linear(x, weight, bias, adapters, row_adapter)
    stack: RoutedStack = routed_stack(adapters, row_adapter, rank_dim=0)
    if not stack.present:
        return F.linear(x, weight, bias)
    factors = [adapters[i].lora_A for i in stack.present] + [adapters[i].lora_B for i in stack.present]
    return _apply_linear(x, weight, bias, stack.scales, stack.ids, stack.dropout_p, stack.ranks, *factors)


def _check_bag(layout: BagLayout, bag_adapter, dtype, name: str) -> None:
    if bag_adapter.dim() != 1 or bag_adapter.numel() != layout.num_bags:
        raise ValueError(f"{name}: {bag_adapter.numel()} bag adapter ids for {layout.num_bags} bags")
    if dtype not in _TRITON_DTYPES:
        raise TypeError(f"{name}: the adapter must be float32, bfloat16 or float16 here, got {dtype}")


def segmented_lora_bag_stacked(layout: BagLayout, lora_A, lora_B, scales, bag_adapter, base_output=None):
    """base_j + s_a·(Σ_{i∈I_j} w_i·A_a[i])·B_a with a = bag_adapter[j] (−1: none), as
    :func:`recpeft.kernels.reference.segmented_lora_bag_stacked`: lora_A [n, V, R] (unit column
    stride), lora_B [n, R, D], scales [n]; base_output [nb, D] or None (the delta alone). The ids
    are not range-checked here (``bag_layout`` does that)."""
    if _float64(lora_A, lora_B, base_output):
        return reference.segmented_lora_bag_stacked(layout, lora_A, lora_B, scales, bag_adapter, base_output)
    name = "segmented_lora_bag_stacked"
    n, _, rank = lora_A.shape if lora_A.dim() == 3 else (0, 0, 0)
    check_stacked(lora_A, lora_B, scales, bag_adapter, a_shape=(-1, -1, -1), b_shape=(n, rank, -1), name=name)
    _check_bag(layout, bag_adapter, lora_A.dtype, name)
    if base_output is None:
        base_output = lora_B.new_zeros(layout.num_bags, lora_B.shape[2])
    return _apply_bag(layout, base_output, scales, bag_adapter, None, _rows(lora_A), lora_B)


def _apply_bag(layout, base, scales, bag_adapter, ranks, *factors):
    weights = layout.weights.detach() if layout.weights is not None else None
    return SegmentedLoraBagFunction.apply(
        base,
        scales.to(device=base.device, dtype=torch.float32),
        bag_adapter,
        layout.ids,
        layout.bag_of_id,
        layout.offsets,
        weights,
        ranks,
        *factors,
    )


def segmented_lora_bag_delta(
    layout: BagLayout, adapters: list[reference.AdapterWeights | None], bag_adapter, out_dim, dtype
):
    """The layers' form: delta_j = s_a·(Σ w_i·A_a[i])·B_a with a = bag_adapter[j] (zero for −1),
    [nb, D] of ``dtype``, as :func:`recpeft.kernels.reference.segmented_lora_bag_delta`. Each
    adapter's table A_a [V, r_a] is read in place (never stacked); B's are stacked padded."""
    delta = torch.zeros(layout.num_bags, out_dim, dtype=dtype, device=bag_adapter.device)
    weights = [a for a in adapters if a is not None]
    if _float64(delta, *(t for a in weights for t in (a.lora_A, a.lora_B))):
        return reference.segmented_lora_bag_delta(layout, adapters, bag_adapter, out_dim, dtype)
    stack = routed_stack(adapters, bag_adapter, rank_dim=1)
    if not stack.present:
        return delta
    _check_bag(layout, bag_adapter, weights[0].lora_A.dtype, "segmented_lora_bag_delta")
    factors = [_rows(adapters[i].lora_A) for i in stack.present] + [adapters[i].lora_B for i in stack.present]
    return _apply_bag(layout, delta, stack.scales, stack.ids, stack.ranks, *factors)
