"""Fused LoRA linear in Triton: y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ with W frozen, forward and backward.

Notation (DESIGN.md, "LoRA linear"): x [M, K] (any leading shape, flattened to rows), W [N, K],
b [N], A [r, K], B [N, r], s the scale, d inverted dropout with keep probability 1 − p.

Forward::

    u  = d(x)·Aᵀ                          [M, r]  the shrink; kept for backward in float32
    y  = x·Wᵀ + b + s·u·Bᵀ                [M, N]

Backward, given dY [M, N]::

    v  = dY·B                             [M, r]
    dX = dY·W + s·(v·A) ⊙ m               m = keep mask / (1 − p), the mask of d(x)
    dA = s·vᵀ·d(x)                        [r, K]
    dB = s·dYᵀ·u                          [N, r]
    db = Σ_rows dY                        [N]   (only when the bias is trained)

Two routes compute it (DESIGN.md; :class:`~.reference.LinearRoute`):

* **Epilogue** (any p). Forward: u = d(x)·Aᵀ, then one Triton GEMM whose fp32 accumulator takes
  s·u·Bᵀ before the single store of y — no M×N intermediate. Backward: one Triton GEMM for dX
  whose accumulator takes s·(v·A)⊙m in its epilogue; in the same kernel dB accumulates s·dYᵀ·u
  from the dY tiles the GEMM loads anyway, and dA accumulates s·vᵀ·d(x) from the x tile at the
  dX tile's position. u (forward) and v (backward) are either *folded* into the GEMM's reduction
  loop (every output tile of a row block recomputes them: 2·M·K·r flops per extra tile, no extra
  bytes) or made by the separate skinny-products kernel (one more read of x or dY);
  :func:`fold_rank_product` picks by the cost model below. Dropout forces the separate pass in
  forward (the mask would be drawn once per output tile otherwise).
* **Merge** (p = 0 only). y = x·(W + s·B·A)ᵀ + b exactly: form W' = W + s·B·A (K·N·r
  multiply-adds, r/M of the GEMM) and run the library GEMM (cuBLAS / MKL) forward and for
  dX = dY·W'. W' is formed again in backward rather than saved (a K×N buffer per layer held until
  backward would double the frozen weight's memory). One Triton kernel makes the skinny
  products (``_skinny_products_kernel``): per block of rows it computes u = x·Aᵀ, then in one
  pass over dY both v = dY·B and dB += s·dYᵀ·u, then dA += s·vᵀ·x — x and dY are each read once
  (x twice, the second time from L2 when a row block fits).

dA, dB and db are sums over rows; every program adds its rows' share into float32 buffers with
``tl.atomic_add`` (coalesced: the [BLOCK, r] and [r, BLOCK] tiles are contiguous), which are then
cast to the parameter dtype. All products accumulate in float32; operands of ``tl.dot`` are in the
input dtype (fp32 inputs use IEEE fp32 products, not TF32, to match torch's default). float64
inputs never reach the kernels: :func:`lora_linear` runs the reference op for them.

**Dropout mask.** Counter-based: keep_ij = philox(seed, counters (j, i, 0, 0)) mapped to a
uniform in [0, 1) ≥ p, for row i and column j of the flattened x. The op draws ``seed`` once per
forward from torch's default (CPU) generator (:func:`draw_dropout_seed`, so ``torch.manual_seed``
reproduces it) and keeps only that integer: forward (in the shrink) and backward (in the dX
epilogue and for dA) regenerate the identical mask from (seed, i, j), so no M×K mask and no copy
of d(x) is saved. :func:`dropout_keep_scale` materialises the same m for tests.

Saved for backward: the input rows x (what y needs anyway), u in float32 (epilogue route), W, A,
B, and the seed — never an M×N tensor.

Sources: Triton tutorial 03 (grouped tile order), tutorial 05 (philox dropout mask from a seed);
DESIGN.md for the two routes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .failures import naming_kernel_failures
from .launch import DOT_MIN, INTERPRETING, SHARED_MEMORY_LIMIT, padded_rank
from .reference import LinearRoute

# ---------------------------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------------------------

# The interpreter flag, DOT_MIN and the rank padding (padded_rank) are shared with the other op
# files: kernels/launch.py.
INT32_LIMIT = 2**31  # W offsets are int32 (row offsets of x, dY, y, dX are int64)
# Dropout seeds are drawn below this: Triton passes a Python int under 2^31 as int32, so every
# seed runs the same compiled kernel (the seed is not specialised on either).
SEED_LIMIT = 2**31 - 1
_UPCAST_BF16_DOTS = tl.constexpr(INTERPRETING)  # see _dot

# Cost model behind the per-shape choices (route, fold). No GPU was available when these were
# set, so they are datasheet figures and assumptions, NOT measurements: the H200 SXM's dense bf16
# matrix rate and HBM3e bandwidth, a guessed Triton-vs-cuBLAS GEMM slowdown and launch cost.
# benchmarks/gpu_sections/linear.py times both routes and both fold settings at the suite's
# shapes and prints this model's picks beside the measurements, so the first GPU run can
# replace these numbers.
MODEL_MATMUL_TFLOPS = 989.0  # H200 SXM dense bf16 (datasheet)
MODEL_COPY_GBPS = 4800.0  # H200 HBM3e (datasheet)
MODEL_TRITON_GEMM_SLOWDOWN = 1.15  # assumed: Triton tile GEMM time / cuBLAS time, same GEMM
MODEL_LAUNCH_S = 3e-6  # assumed: one more kernel on the GPU timeline
MODEL_OUTPUT_TILE = 128  # the BLOCK_N / BLOCK_K the GEMM configs below mostly use
MAX_FOLDED_RANK = 64  # padded r above this: the folded [BLOCK_M, r] accumulator spills registers


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _grouped_tile(pid, M, C, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid``, GROUP_M row tiles at a time so that the
    programs running together share their W tiles in L2 (Triton tutorial 03)."""
    tiles_c = tl.cdiv(C, BLOCK_C)
    per_group = GROUP_M * tiles_c
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_c = (pid % per_group) // group_rows
    return pid_m, pid_c


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a·b with float32 accumulation (acc None: a fresh float32 result). The interpreter
    (triton 3.9) multiplies bf16 operands' raw bits, so there bf16 operands are upcast to float32
    first — exact, and the same products and float32 sums the GPU's bf16 MMA computes."""
    if _UPCAST_BF16_DOTS:
        if a.dtype == tl.bfloat16:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _keep_scale(seed, rows, cols, p):
    """m_ij = keep_ij / (1 − p) for the tile rows × cols: philox(seed, (j, i, 0, 0)) → uniform
    in [0, 1); keep where uniform ≥ p."""
    col_ctr = (cols[None, :] + 0 * rows[:, None]).to(tl.uint32)
    row_ctr = (rows[:, None] + 0 * cols[None, :]).to(tl.uint32)
    zero = tl.zeros_like(col_ctr)
    bits, _, _, _ = tl.philox(seed, col_ctr, row_ctr, zero, zero)
    uniform = tl.uint_to_uniform_float(bits)
    return tl.where(uniform >= p, 1.0 / (1.0 - p), 0.0)


@triton.jit
def _load_dropped(x_ptr, rows, cols, M, K, stride_xm, stride_xk, p, seed, DROPOUT: tl.constexpr):
    """The d(x) tile rows × cols in x's dtype (zeros outside the matrix)."""
    tile = tl.load(
        x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
        mask=(rows < M)[:, None] & (cols < K)[None, :],
        other=0.0,
    )
    if DROPOUT:
        tile = (tile.to(tl.float32) * _keep_scale(seed, rows, cols, p)).to(tile.dtype)
    return tile


@triton.jit
def _keep_scale_kernel(out_ptr, M, K, p, seed, BLOCK: tl.constexpr):
    """out [M, K] = m, the dropout multiplier the other kernels regenerate (tests read it)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    tl.store(
        out_ptr + rows[:, None] * K + cols[None, :],
        _keep_scale(seed, rows, cols, p),
        mask=(rows < M)[:, None] & (cols < K)[None, :],
    )


@triton.jit
def _forward_kernel(
    # pointers: inputs, then outputs
    x_ptr,
    w_ptr,
    bias_ptr,
    a_ptr,
    b_ptr,
    u_ptr,  # [M, R] float32: read (FOLD_SHRINK off) or written by column tile 0 (FOLD_SHRINK on)
    y_ptr,
    # sizes and scalars
    M,
    N,
    K,
    R,
    M_BUCKET,  # next power of two of M: the autotune key, unused in the body
    scale,
    # strides (elements)
    stride_xm,
    stride_xk,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_ym,
    # modes
    HAS_BIAS: tl.constexpr,
    FOLD_SHRINK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    # tiles (autotuned)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y tile = x·Wᵀ + s·u·Bᵀ + b, stored once; u = x·Aᵀ folded into the loop over K (and stored
    for backward by column tile 0) or loaded."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, R_PAD)
    row_ok, col_ok, rank_ok = rows < M, cols < N, ranks < R

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        x_tile = tl.load(
            x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        wt_tile = tl.load(
            w_ptr + ks[:, None] * stride_wk + cols[None, :] * stride_wn, mask=k_ok[:, None] & col_ok[None, :], other=0.0
        )  # Wᵀ [BLOCK_K, BLOCK_N]
        acc = _dot(x_tile, wt_tile, acc, DOT_PRECISION)
        if FOLD_SHRINK:
            at_tile = tl.load(
                a_ptr + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
                mask=k_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )  # Aᵀ [BLOCK_K, R_PAD]
            u = _dot(x_tile, at_tile, u, DOT_PRECISION)

    u_ptrs = u_ptr + rows[:, None] * R + ranks[None, :]
    u_mask = row_ok[:, None] & rank_ok[None, :]
    if FOLD_SHRINK:
        if pid_n == 0:  # one column tile per row block writes u
            tl.store(u_ptrs, u, mask=u_mask)
    else:
        u = tl.load(u_ptrs, mask=u_mask, other=0.0)
    bt_tile = tl.load(
        b_ptr + ranks[:, None] * stride_br + cols[None, :] * stride_bn,
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )  # Bᵀ [R_PAD, BLOCK_N]
    acc = _dot((u * scale).to(bt_tile.dtype), bt_tile, acc, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + rows[:, None] * stride_ym + cols[None, :],
        acc.to(y_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )


@triton.jit(do_not_specialize=["seed"])
def _grad_x_kernel(
    # pointers: inputs
    dy_ptr,
    w_ptr,
    a_ptr,
    b_ptr,
    v_ptr,  # [M, R] float32 v = dY·B, read when FOLD_V is off
    u_ptr,  # [M, R] float32 u from forward (FOLD_V)
    x_ptr,  # x (FOLD_V)
    # pointers: outputs (da, db, dbias are float32 accumulators, zero on entry)
    dx_ptr,
    da_ptr,
    db_ptr,
    dbias_ptr,
    # sizes and scalars
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotune key
    scale,
    p,
    seed,
    # strides (elements)
    stride_dym,
    stride_dyn,
    stride_wn,
    stride_wk,
    stride_ar,
    stride_ak,
    stride_bn,
    stride_br,
    stride_xm,
    stride_xk,
    stride_dxm,
    # modes
    FOLD_V: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    # tiles (autotuned)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dX tile = dY·W + s·(v·A) ⊙ m, stored once; v = dY·B folded into the loop over N (FOLD_V)
    or loaded. With FOLD_V the kernel also makes the adapter's gradients (else the skinny-products
    kernel has): dB += s·dYᵀ·u over this program's share of the N chunks (chunk j goes to column
    tile j mod the number of column tiles), db += Σ dY likewise (HAS_DBIAS), and
    dA[:, cols] += s·vᵀ·d(x) from the x tile under the dX tile."""
    pid_m, pid_k = _grouped_tile(tl.program_id(0), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ranks = tl.arange(0, R_PAD)
    row_ok, col_ok, rank_ok = rows < M, cols < K, ranks < R
    dtype = dy_ptr.dtype.element_ty
    col_tiles = tl.cdiv(K, BLOCK_K)

    if FOLD_V:
        su = tl.load(u_ptr + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        su = (su * scale).to(dtype)  # s·u [BLOCK_M, R_PAD]
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    v = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        dy_tile = tl.load(
            dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
            mask=row_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        w_tile = tl.load(
            w_ptr + ns[:, None] * stride_wn + cols[None, :] * stride_wk, mask=n_ok[:, None] & col_ok[None, :], other=0.0
        )  # W [BLOCK_N, BLOCK_K]
        acc = _dot(dy_tile, w_tile, acc, DOT_PRECISION)
        if FOLD_V:
            b_tile = tl.load(
                b_ptr + ns[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=n_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )  # B [BLOCK_N, R_PAD]
            v = _dot(dy_tile, b_tile, v, DOT_PRECISION)
            if (n0 // BLOCK_N) % col_tiles == pid_k:  # this program's share of dB and db
                db_part = _dot(tl.trans(dy_tile), su, None, DOT_PRECISION)  # [BLOCK_N, R_PAD]
                tl.atomic_add(db_ptr + ns[:, None] * R + ranks[None, :], db_part, mask=n_ok[:, None] & rank_ok[None, :])
                if HAS_DBIAS:
                    tl.atomic_add(dbias_ptr + ns, tl.sum(dy_tile.to(tl.float32), axis=0), mask=n_ok)

    if not FOLD_V:
        v = tl.load(v_ptr + rows[:, None] * R + ranks[None, :], mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    sv = (v * scale).to(dtype)  # s·v [BLOCK_M, R_PAD]
    a_tile = tl.load(
        a_ptr + ranks[:, None] * stride_ar + cols[None, :] * stride_ak,
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )  # A [R_PAD, BLOCK_K]
    if DROPOUT:
        keep = _keep_scale(seed, rows, cols, p)
        acc += _dot(sv, a_tile, None, DOT_PRECISION) * keep
    else:
        acc = _dot(sv, a_tile, acc, DOT_PRECISION)
    tl.store(
        dx_ptr + rows[:, None] * stride_dxm + cols[None, :],
        acc.to(dx_ptr.dtype.element_ty),
        mask=row_ok[:, None] & col_ok[None, :],
    )

    if FOLD_V:
        x_drop = tl.load(
            x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk,
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            x_drop = (x_drop.to(tl.float32) * keep).to(dtype)
        da_part = _dot(tl.trans(sv), x_drop, None, DOT_PRECISION)  # [R_PAD, BLOCK_K]
        tl.atomic_add(da_ptr + ranks[:, None] * K + cols[None, :], da_part, mask=rank_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["seed"])
def _skinny_products_kernel(
    # pointers: inputs
    x_ptr,
    a_ptr,
    dy_ptr,
    b_ptr,
    # pointers: u [M, R] float32 (written with STORE_U, read without COMPUTE_U), v [M, R] float32
    # (written with STORE_V), float32 accumulators da [R, K], db [N, R], dbias [N] (zero on entry)
    u_ptr,
    v_ptr,
    da_ptr,
    db_ptr,
    dbias_ptr,
    # sizes and scalars
    M,
    N,
    K,
    R,
    M_BUCKET,  # autotune key
    scale,
    p,
    seed,
    # strides (elements)
    stride_xm,
    stride_xk,
    stride_ar,
    stride_ak,
    stride_dym,
    stride_dyn,
    stride_bn,
    stride_br,
    # modes
    COMPUTE_U: tl.constexpr,
    STORE_U: tl.constexpr,
    BACKWARD: tl.constexpr,
    STORE_V: tl.constexpr,
    HAS_DBIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    R_PAD: tl.constexpr,
    # tiles (autotuned): rows per program, columns per step of the loops over K and N
    BLOCK_M: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """The skinny products for one block of rows, in three loops:
    over K: u = d(x)·Aᵀ (COMPUTE_U; else u is loaded);
    over N (BACKWARD): v = dY·B, dB += s·dYᵀ·u, db += Σ dY — one read of dY for all three;
    over K (BACKWARD): dA += s·vᵀ·d(x)."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    ranks = tl.arange(0, R_PAD)
    row_ok, rank_ok = rows < M, ranks < R
    dtype = x_ptr.dtype.element_ty
    u_ptrs = u_ptr + rows[:, None] * R + ranks[None, :]
    rows_ranks_ok = row_ok[:, None] & rank_ok[None, :]

    if COMPUTE_U:
        u = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_C):
            ks = k0 + tl.arange(0, BLOCK_C)
            x_drop = _load_dropped(x_ptr, rows, ks, M, K, stride_xm, stride_xk, p, seed, DROPOUT)
            at_tile = tl.load(
                a_ptr + ks[:, None] * stride_ak + ranks[None, :] * stride_ar,
                mask=(ks < K)[:, None] & rank_ok[None, :],
                other=0.0,
            )  # Aᵀ [BLOCK_C, R_PAD]
            u = _dot(x_drop, at_tile, u, DOT_PRECISION)
        if STORE_U:
            tl.store(u_ptrs, u, mask=rows_ranks_ok)
    else:
        u = tl.load(u_ptrs, mask=rows_ranks_ok, other=0.0)

    if BACKWARD:
        su = (u * scale).to(dtype)
        v = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        for n0 in range(0, N, BLOCK_C):
            ns = n0 + tl.arange(0, BLOCK_C)
            n_ok = ns < N
            dy_tile = tl.load(
                dy_ptr + rows[:, None] * stride_dym + ns[None, :] * stride_dyn,
                mask=row_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            b_tile = tl.load(
                b_ptr + ns[:, None] * stride_bn + ranks[None, :] * stride_br,
                mask=n_ok[:, None] & rank_ok[None, :],
                other=0.0,
            )  # B [BLOCK_C, R_PAD]
            v = _dot(dy_tile, b_tile, v, DOT_PRECISION)
            db_part = _dot(tl.trans(dy_tile), su, None, DOT_PRECISION)  # [BLOCK_C, R_PAD]
            tl.atomic_add(db_ptr + ns[:, None] * R + ranks[None, :], db_part, mask=n_ok[:, None] & rank_ok[None, :])
            if HAS_DBIAS:
                tl.atomic_add(dbias_ptr + ns, tl.sum(dy_tile.to(tl.float32), axis=0), mask=n_ok)
        if STORE_V:
            tl.store(v_ptr + rows[:, None] * R + ranks[None, :], v, mask=rows_ranks_ok)
        sv_t = tl.trans((v * scale).to(dtype))  # (s·v)ᵀ [R_PAD, BLOCK_M]
        for k0 in range(0, K, BLOCK_C):
            ks = k0 + tl.arange(0, BLOCK_C)
            x_drop = _load_dropped(x_ptr, rows, ks, M, K, stride_xm, stride_xk, p, seed, DROPOUT)
            da_part = _dot(sv_t, x_drop, None, DOT_PRECISION)  # [R_PAD, BLOCK_C]
            tl.atomic_add(da_ptr + ranks[:, None] * K + ks[None, :], da_part, mask=rank_ok[:, None] & (ks < K)[None, :])


# ---------------------------------------------------------------------------------------------
# Launch settings
# ---------------------------------------------------------------------------------------------


def _gemm_config(block_m, block_n, block_k, warps, stages):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8}, num_warps=warps, num_stages=stages
    )


# Hopper-sized tiles (Triton tutorial 03's fp16 list, trimmed to three each: every config is a
# compile per kernel variant, and the GPU suite compiles them all within its time budget). The y
# GEMM's column tile is BLOCK_N, the dX GEMM's is BLOCK_K; the dX GEMM carries v and s·u besides
# its accumulator, so its tiles stop at 128×128. Plus, last, a small config that fits the
# shared memory of every dtype and rank: float32 with a folded rank of 64 or 128 fits none of
# the three. The autotuner sees only the configs that fit (reachable_configs; the compiled
# figures are in benchmarks/results/aot_sm90.json).
FORWARD_CONFIGS = [
    _gemm_config(128, 256, 64, 8, 3),
    _gemm_config(128, 128, 64, 8, 4),
    _gemm_config(64, 128, 64, 4, 4),
    _gemm_config(64, 64, 32, 4, 3),
]
GRAD_X_CONFIGS = [
    _gemm_config(128, 128, 64, 8, 3),
    _gemm_config(128, 64, 64, 8, 4),  # 4 warps spilled up to 848 B at r = 64 (folded v, dropout)
    _gemm_config(64, 128, 64, 4, 4),
    _gemm_config(64, 64, 32, 4, 3),
]
# Skinny-products kernel: 32-row blocks keep M=8192 at 256 programs (two per SM); larger blocks
# halve the atomic adds per row. 8 warps: with 4 the 128-wide column tiles spilled at r = 64.
SKINNY_PRODUCTS_CONFIGS = [
    triton.Config({"BLOCK_M": 32, "BLOCK_C": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 64, "BLOCK_C": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_C": 64}, num_warps=8, num_stages=3),
]
# The interpreter cannot time configs (autotune needs a GPU driver then) and is slow on big
# tiles: one small config per kernel, whose tiles still give the tests (matrices up to 48 wide)
# several tiles per matrix.
INTERPRETER_TILE = DOT_MIN
INTERPRETER_CONFIGS = {
    "forward": _gemm_config(INTERPRETER_TILE, INTERPRETER_TILE, INTERPRETER_TILE, 4, 1),
    "grad_x": _gemm_config(INTERPRETER_TILE, INTERPRETER_TILE, INTERPRETER_TILE, 4, 1),
    "skinny_products": triton.Config(
        {"BLOCK_M": INTERPRETER_TILE, "BLOCK_C": INTERPRETER_TILE}, num_warps=4, num_stages=1
    ),
}
# float32 at full precision ("ieee": TF32 off) runs tl.dot on the FMA units, with the accumulator
# and both operand fragments in registers: the tensor-core tiles above spill there (up to 100 KB
# at 128×256), so those launches tune over these smaller tiles instead, none of which spills at
# r = 8 (sm_90, triton 3.9; benchmarks/results/aot_sm90*.json). The folded dX GEMM spills at every
# FMA tile tried (32×64 to 128×64), so the cost model never folds it there
# (:func:`fold_rank_product`).
FMA_CONFIGS = {
    "forward": [_gemm_config(64, 128, 32, 8, 3), _gemm_config(128, 64, 32, 8, 3), _gemm_config(64, 64, 32, 4, 3)],
    "grad_x": [_gemm_config(64, 128, 32, 8, 3), _gemm_config(128, 64, 32, 8, 3), _gemm_config(64, 64, 32, 4, 3)],
    "skinny_products": [
        triton.Config({"BLOCK_M": 32, "BLOCK_C": 64}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 64, "BLOCK_C": 32}, num_warps=4, num_stages=3),
    ],
}
TENSOR_CORE_CONFIGS = {
    "forward": FORWARD_CONFIGS,
    "grad_x": GRAD_X_CONFIGS,
    "skinny_products": SKINNY_PRODUCTS_CONFIGS,
}
# The autotuners' spaces: both families; each launch keeps its own (:func:`tuning_space`).
KERNEL_CONFIGS = {name: TENSOR_CORE_CONFIGS[name] + FMA_CONFIGS[name] for name in TENSOR_CORE_CONFIGS}
# The mask kernel (tests and the GPU suite's checks only): square blocks of this many rows and
# columns; elementwise, so any size is right and this one is not tuned.
KEEP_SCALE_BLOCK = 64

# The autotune key of each kernel: the shape and every constexpr mode (a mode changes the
# compiled kernel, so its best config and its shared memory). Tensor dtypes are added by triton.
_SHAPE_KEY = ["M_BUCKET", "N", "K", "R_PAD"]
_TUNING_KEYS = {
    "forward": _SHAPE_KEY + ["HAS_BIAS", "FOLD_SHRINK"],
    "grad_x": _SHAPE_KEY + ["FOLD_V", "HAS_DBIAS", "DROPOUT"],
    "skinny_products": _SHAPE_KEY + ["COMPUTE_U", "STORE_U", "BACKWARD", "STORE_V", "HAS_DBIAS", "DROPOUT"],
}
# dA, dB, db: float32 sums that kernels add into with atomics. They may hold results made
# before the kernel runs (on the separate-products route the skinny-products kernel fills them
# and then the dX GEMM runs with FOLD_V off), so the autotuner must neither zero them nor let its
# timing runs add into them: it snapshots them before each timing run and restores them after
# (``restore_value``), and the run that counts starts from what the caller passed.
_ACCUMULATORS = ["da_ptr", "db_ptr", "dbias_ptr"]
_WRITES_ACCUMULATORS = {"forward": False, "grad_x": True, "skinny_products": True}


def _loop_tile_elements(name: str, meta: dict, r_pad: int, folded: bool) -> int:
    """Elements of the operand tiles one step of the kernel's main loop loads for ``tl.dot``
    (what triton's software pipeline keeps in shared memory, once per stage)."""
    if name == "forward":  # x [BM, BK], Wᵀ [BK, BN], folded Aᵀ [BK, R]
        return meta["BLOCK_K"] * (meta["BLOCK_M"] + meta["BLOCK_N"] + folded * r_pad)
    if name == "grad_x":  # dY [BM, BN], W [BN, BK], folded B [BN, R]
        return meta["BLOCK_N"] * (meta["BLOCK_M"] + meta["BLOCK_K"] + folded * r_pad)
    return meta["BLOCK_C"] * (meta["BLOCK_M"] + r_pad)  # x or dY [BM, BC], Aᵀ or B [BC, R]


def shared_memory_estimate(name: str, config: triton.Config, dtype: torch.dtype, meta: dict) -> int:
    """Bytes of shared memory kernel ``name`` needs at ``config`` for operands of ``dtype`` and
    the launch's constexprs ``meta`` (R_PAD, FOLD_SHRINK / FOLD_V). Model: the loop's operand
    tiles, buffered num_stages times (16-bit operands, which the wgmma reads from shared memory)
    or num_stages − 1 times (float32), plus scratch for the layout conversions: float32
    [BLOCK_M, R_PAD] tiles (s·u; s·v too in the folded dX GEMM) and the transposed dY tile of
    dB — [BLOCK_M, BLOCK_C] float32 in the skinny-products kernel, [BLOCK_M, BLOCK_N] in the
    folded dX GEMM; for the forward, at least the epilogue's operands of s·u·Bᵀ (u float32
    [BLOCK_M, R_PAD] and the B tile [BLOCK_N, R_PAD]: 96 KB of the FMA tiles' 64×128 at R_PAD
    128). Fitted to, and an upper bound of, ``metadata.shared`` of
    every variant kernels/aot.py compiles (its table has both; its gate checks the bound)."""
    r_pad, block_m = meta["R_PAD"], config.kwargs["BLOCK_M"]
    folded = bool(meta.get("FOLD_SHRINK", False) or meta.get("FOLD_V", False))
    element = torch.empty((), dtype=dtype).element_size()
    buffers = config.num_stages if element < 4 else max(config.num_stages - 1, 1)
    scratch = block_m * r_pad * 4
    if name == "skinny_products":  # dYᵀ in float32, and at 8 warps a second copy in the operand dtype
        scratch += block_m * config.kwargs["BLOCK_C"] * (4 + (element if config.num_warps >= 8 else 0))
    elif name == "grad_x" and folded:  # s·u beside s·v, and dYᵀ
        scratch += block_m * r_pad * 4 + block_m * config.kwargs["BLOCK_N"] * element
    loop = _loop_tile_elements(name, config.kwargs, r_pad, folded) * element * buffers + scratch
    if name == "forward":  # the epilogue's s·u·Bᵀ stages u and the B tile, reusing the loop's buffers
        return max(loop, block_m * r_pad * 4 + config.kwargs["BLOCK_N"] * r_pad * element)
    return loop


def tuning_space(name: str, meta: dict) -> list:
    """The config family of kernel ``name`` for a launch with constexprs ``meta``: the FMA tiles
    when its dot runs at full fp32 precision (``DOT_PRECISION`` "ieee"), else the tensor-core tiles."""
    return (FMA_CONFIGS if meta.get("DOT_PRECISION") == "ieee" else TENSOR_CORE_CONFIGS)[name]


def reachable_configs(name: str, configs: list, dtype: torch.dtype, meta: dict) -> list:
    """The configs of ``configs`` the autotuner may pick for one launch: those of the launch's
    family (:func:`tuning_space`; all of ``configs`` when none is, as for a test's own list) whose
    :func:`shared_memory_estimate` fits :data:`~.launch.SHARED_MEMORY_LIMIT` (a config over it
    compiles but cannot launch), else the one needing least, so that a launch always has one."""
    family = tuning_space(name, meta)
    configs = [c for c in configs if any(c is f for f in family)] or configs
    need = {id(c): shared_memory_estimate(name, c, dtype, meta) for c in configs}
    fitting = [c for c in configs if need[id(c)] <= SHARED_MEMORY_LIMIT]
    return fitting or [min(configs, key=lambda c: need[id(c)])]


# The operand whose dtype is the launch's: x (forward, skinny products) or dY (dX GEMM).
_OPERAND = {"forward": "x_ptr", "grad_x": "dy_ptr", "skinny_products": "x_ptr"}


def _pruner(name: str):
    """The autotuner's ``early_config_prune`` for kernel ``name``: :func:`reachable_configs`."""

    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        return reachable_configs(name, configs, args[_OPERAND[name]].dtype, args)

    return prune


def tuned_kernels(configs: dict | None = None, do_bench=None) -> dict:
    """name → the autotuned kernel, over ``configs[name]`` (default: the GPU configs, or the one
    interpreter config under the interpreter), timed by ``do_bench`` (default: triton's).
    The tests build these with several configs and a stand-in ``do_bench`` to run the
    autotuner's benchmarking under the interpreter."""
    tuned = {}
    for name, kernel in _KERNELS.items():
        space = (configs or {}).get(name) or ([INTERPRETER_CONFIGS[name]] if INTERPRETING else KERNEL_CONFIGS[name])
        tuned[name] = triton.autotune(
            space,
            key=_TUNING_KEYS[name],
            restore_value=_ACCUMULATORS if _WRITES_ACCUMULATORS[name] else None,
            prune_configs_by={"early_config_prune": _pruner(name)},
            do_bench=do_bench,
        )(kernel)
    return tuned


_KERNELS = {"forward": _forward_kernel, "grad_x": _grad_x_kernel, "skinny_products": _skinny_products_kernel}
_TUNED = tuned_kernels()


def _launch(name: str, grid, configs: dict | None, **args):
    """Run kernel ``name`` autotuned, or with ``configs[name]`` (a triton.Config) when given —
    how the GPU suite compiles and checks every config the autotuner can pick."""
    config = (configs or {}).get(name)
    if config is None:
        _TUNED[name][grid](**args)
    else:
        _KERNELS[name][grid](**args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


def fp32_uses_tf32() -> bool:
    """Whether torch lets float32 matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32``, or
    ``torch.set_float32_matmul_precision("high" | "medium")``): the kernels follow the same
    setting, so a model computes its fp32 products the same way in cuBLAS and in Triton."""
    return bool(torch.backends.cuda.matmul.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def _dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: fp32 as torch's setting says (full "ieee" runs on FMA units, not
    tensor cores); "tf32" is ignored for 16-bit inputs."""
    return "tf32" if dtype != torch.float32 or fp32_uses_tf32() else "ieee"


def default_route(x: torch.Tensor, weight: torch.Tensor, lora_A: torch.Tensor, dropout_active: bool) -> LinearRoute:
    """The route when the caller names none: on CUDA, full-precision fp32 without dropout takes the
    merge route (one library GEMM on W + s·B·A: Triton's ieee fp32 dot runs on FMA units and spills,
    see benchmarks/results/aot_sm90.json); otherwise the cost model's choice (:func:`choose_route`)."""
    if x.is_cuda and x.dtype == torch.float32 and not fp32_uses_tf32() and not dropout_active:
        return LinearRoute.MERGE
    rows = x.numel() // max(x.shape[-1], 1)
    return choose_route(rows, weight.shape[1], weight.shape[0], lora_A.shape[0], x.element_size(), dropout_active)


def _shape_args(m: int, r: int, dtype: torch.dtype) -> dict:
    return {
        "M_BUCKET": triton.next_power_of_2(max(m, 1)),
        "R_PAD": padded_rank(r),
        "DOT_PRECISION": _dot_precision(dtype),
    }


# ---------------------------------------------------------------------------------------------
# Route and fold: the cost model (seconds on the roofline; see the constants at the top)
# ---------------------------------------------------------------------------------------------


def _flop_seconds(flops: float) -> float:
    return flops / (MODEL_MATMUL_TFLOPS * 1e12)


def _pass_seconds(nbytes: float) -> float:
    """One extra memory-bound kernel moving ``nbytes``."""
    return nbytes / (MODEL_COPY_GBPS * 1e9) + MODEL_LAUNCH_S


def _gemm_seconds(m: int, k: int, n: int, elt: int) -> float:
    return max(_flop_seconds(2.0 * m * k * n), (m * k + k * n + m * n) * elt / (MODEL_COPY_GBPS * 1e9))


def _fold_seconds(m: int, reduce_dim: int, out_dim: int, r: int) -> float:
    """Extra time of folding a rank product over ``reduce_dim`` into a GEMM with ``out_dim``
    output columns: every column tile after the first recomputes it."""
    extra_tiles = triton.cdiv(out_dim, MODEL_OUTPUT_TILE) - 1
    return _flop_seconds(2.0 * m * reduce_dim * padded_rank(r) * extra_tiles)


def fold_rank_product(m: int, reduce_dim: int, out_dim: int, r: int, elt: int) -> bool:
    """Fold u = x·Aᵀ (forward: reduce over K, N output columns) or v = dY·B (dX: reduce over N,
    K output columns) into the GEMM, rather than a separate pass over the M×reduce_dim operand?"""
    if padded_rank(r) > MAX_FOLDED_RANK:
        return False
    return _fold_seconds(m, reduce_dim, out_dim, r) < _pass_seconds(m * reduce_dim * elt)


def route_extra_seconds(m: int, k: int, n: int, r: int, elt: int) -> dict[LinearRoute, float]:
    """Modelled forward+backward time each route adds to the frozen layer's (dropout 0)."""
    form_merged = _pass_seconds(3.0 * k * n * elt) + _flop_seconds(2.0 * k * n * r)  # read W, write+read W'
    merge = 2 * form_merged + _pass_seconds(m * (k + n) * elt)
    shrink = min(_fold_seconds(m, k, n, r), _pass_seconds(m * k * elt))
    expand = min(_fold_seconds(m, n, k, r), _pass_seconds(m * n * elt))
    triton_gemms = (MODEL_TRITON_GEMM_SLOWDOWN - 1.0) * 2 * _gemm_seconds(m, k, n, elt)
    epilogue = triton_gemms + shrink + expand + m * k * elt / (MODEL_COPY_GBPS * 1e9)  # + x read for dA
    return {LinearRoute.MERGE: merge, LinearRoute.EPILOGUE: epilogue}


def choose_route(m: int, k: int, n: int, r: int, elt: int, dropout_active: bool) -> LinearRoute:
    """The cheaper route by :func:`route_extra_seconds`; dropout needs the epilogue route."""
    if dropout_active:
        return LinearRoute.EPILOGUE
    costs = route_extra_seconds(m, k, n, r, elt)
    return min(costs, key=costs.get)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


@dataclass
class LoraGrads:
    """Gradients of the op for x rows [M, K]; None where not requested."""

    x: torch.Tensor | None = None  # [M, K]
    lora_A: torch.Tensor | None = None  # [r, K]
    lora_B: torch.Tensor | None = None  # [N, r]
    bias: torch.Tensor | None = None  # [N]


def draw_dropout_seed() -> int:
    """The seed of one forward's dropout mask, from torch's default CPU generator."""
    return int(torch.randint(SEED_LIMIT, (), dtype=torch.int64).item())


def dropout_keep_scale(seed: int, m: int, k: int, p: float, device) -> torch.Tensor:
    """m [M, K] float32: keep/(1 − p) exactly as the kernels draw it for ``seed``."""
    out = torch.empty(m, k, dtype=torch.float32, device=device)
    block = INTERPRETER_TILE if INTERPRETING else KEEP_SCALE_BLOCK
    if out.numel():
        _keep_scale_kernel[(triton.cdiv(m, block), triton.cdiv(k, block))](out, m, k, float(p), seed, BLOCK=block)
    return out


def _check_operands(x, weight, bias, lora_A, lora_B) -> tuple[int, int, int, int]:
    """(M, K, N, r) after checking shapes, dtypes and devices of the 2-D problem."""
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be [M, K] with unit column stride, got {tuple(x.shape)} strides {x.stride()}")
    m, k = x.shape
    n, r = weight.shape[0], lora_A.shape[0]
    expected = {"weight": (weight, (n, k)), "lora_A": (lora_A, (r, k)), "lora_B": (lora_B, (n, r))}
    if bias is not None:
        expected["bias"] = (bias, (n,))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {shape} for x {tuple(x.shape)}")
        if tensor.dtype != x.dtype or tensor.device != x.device:
            raise TypeError(f"{name} is {tensor.dtype} on {tensor.device}; x is {x.dtype} on {x.device}")
    if weight.numel() >= INT32_LIMIT:
        raise ValueError(f"weight has {weight.numel()} elements; the kernels index W with int32")
    return m, k, n, r


def _output(out: torch.Tensor | None, shape, like: torch.Tensor, dtype=None) -> torch.Tensor:
    dtype = dtype or like.dtype
    if out is None:
        return torch.empty(shape, dtype=dtype, device=like.device)
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or not out.is_contiguous():
        raise ValueError(
            f"preallocated output must be contiguous {dtype} {tuple(shape)}, got {out.dtype} {tuple(out.shape)}"
        )
    return out


def merged_weight(weight, lora_A, lora_B, scale: float) -> torch.Tensor:
    """W' = W + s·B·A (the merge route's GEMM operand)."""
    return torch.addmm(weight, lora_B, lora_A, alpha=scale)


def lora_linear_forward(
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    route: LinearRoute = LinearRoute.EPILOGUE,
    fold: bool | None = None,
    out: torch.Tensor | None = None,
    u_out: torch.Tensor | None = None,
    configs: dict | None = None,
):
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ for x [M, K]. Returns (y [M, N], u [M, r] float32), u None
    on the merge route. ``fold`` None lets :func:`fold_rank_product` decide; ``out``/``u_out``
    are optional preallocated outputs; ``configs`` maps kernel names to fixed triton.Configs."""
    m, k, n, r = _check_operands(x, weight, bias, lora_A, lora_B)
    y = _output(out, (m, n), x)
    if route is LinearRoute.MERGE:
        if dropout_p > 0:
            raise ValueError("the merge route computes no dropout; use the epilogue route")
        return y.copy_(F.linear(x, merged_weight(weight, lora_A, lora_B, scale), bias)), None
    u = _output(u_out, (m, r), x, torch.float32)
    if m == 0:
        return y, u
    if fold is None:
        fold = dropout_p == 0 and fold_rank_product(m, k, n, r, x.element_size())
    if fold and dropout_p > 0:
        raise ValueError("dropout draws its mask in the separate shrink pass; fold=True needs dropout_p=0")
    shape = _shape_args(m, r, x.dtype)
    if not fold:
        _skinny_products(
            x,
            lora_A,
            None,
            lora_B,
            u,
            None,
            None,
            None,
            None,
            scale,
            dropout_p,
            seed,
            compute_u=True,
            store_u=True,
            backward=False,
            configs=configs,
        )
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    _launch(
        "forward",
        grid,
        configs,
        x_ptr=x,
        w_ptr=weight,
        bias_ptr=bias if bias is not None else u,
        a_ptr=lora_A,
        b_ptr=lora_B,
        u_ptr=u,
        y_ptr=y,
        M=m,
        N=n,
        K=k,
        R=r,
        scale=float(scale),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_ym=y.stride(0),
        HAS_BIAS=bias is not None,
        FOLD_SHRINK=fold,
        **shape,
    )
    return y, u


def _skinny_products(
    x,
    lora_A,
    grad_y,
    lora_B,
    u,
    v,
    grad_a,
    grad_b,
    grad_bias,
    scale,
    p,
    seed,
    *,
    compute_u: bool,
    store_u: bool,
    backward: bool,
    configs,
):
    """Launch the skinny-products kernel (u; with ``backward`` v, dA, dB, db); unused pointers get a
    1-element placeholder."""
    m, k = x.shape
    r, n = lora_A.shape[0], lora_B.shape[0]
    placeholder = torch.zeros(1, dtype=torch.float32, device=x.device)
    dy = grad_y if grad_y is not None else x
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)  # noqa: E731
    _launch(
        "skinny_products",
        grid,
        configs,
        x_ptr=x,
        a_ptr=lora_A,
        dy_ptr=dy,
        b_ptr=lora_B,
        u_ptr=u,
        v_ptr=v if v is not None else placeholder,
        da_ptr=grad_a if grad_a is not None else placeholder,
        db_ptr=grad_b if grad_b is not None else placeholder,
        dbias_ptr=grad_bias if grad_bias is not None else placeholder,
        M=m,
        N=n,
        K=k,
        R=r,
        scale=float(scale),
        p=float(p),
        seed=seed,
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        stride_dym=dy.stride(0),
        stride_dyn=dy.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        COMPUTE_U=compute_u,
        STORE_U=store_u,
        BACKWARD=backward,
        STORE_V=v is not None,
        HAS_DBIAS=grad_bias is not None,
        DROPOUT=p > 0,
        **_shape_args(m, r, x.dtype),
    )


def _grad_x(
    grad_y, weight, lora_A, lora_B, v, u, x, grad_x, grad_a, grad_b, grad_bias, scale, p, seed, *, fold_v: bool, configs
):
    """Launch the dX GEMM; with ``fold_v`` it also accumulates dA, dB (and db) from u and x."""
    m, n = grad_y.shape
    k, r = grad_x.shape[1], lora_A.shape[0]
    placeholder = torch.zeros(1, dtype=torch.float32, device=grad_y.device)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    _launch(
        "grad_x",
        grid,
        configs,
        dy_ptr=grad_y,
        w_ptr=weight,
        a_ptr=lora_A,
        b_ptr=lora_B,
        v_ptr=v if v is not None else placeholder,
        u_ptr=u,
        x_ptr=x,
        dx_ptr=grad_x,
        da_ptr=grad_a,
        db_ptr=grad_b,
        dbias_ptr=grad_bias if grad_bias is not None else placeholder,
        M=m,
        N=n,
        K=k,
        R=r,
        scale=float(scale),
        p=float(p),
        seed=seed,
        stride_dym=grad_y.stride(0),
        stride_dyn=grad_y.stride(1),
        stride_wn=weight.stride(0),
        stride_wk=weight.stride(1),
        stride_ar=lora_A.stride(0),
        stride_ak=lora_A.stride(1),
        stride_bn=lora_B.stride(0),
        stride_br=lora_B.stride(1),
        stride_xm=x.stride(0),
        stride_xk=x.stride(1),
        stride_dxm=grad_x.stride(0),
        FOLD_V=fold_v,
        HAS_DBIAS=fold_v and grad_bias is not None,
        DROPOUT=p > 0,
        **_shape_args(m, r, grad_y.dtype),
    )


def lora_linear_backward(
    grad_y,
    x,
    u,
    weight,
    lora_A,
    lora_B,
    scale: float,
    dropout_p: float = 0.0,
    seed: int = 0,
    route: LinearRoute = LinearRoute.EPILOGUE,
    fold: bool | None = None,
    need_x: bool = True,
    need_bias: bool = False,
    out: LoraGrads | None = None,
    configs: dict | None = None,
) -> LoraGrads:
    """dX, dA, dB (and db with ``need_bias``) for dY [M, N] and the forward's x [M, K] and u
    (epilogue route; None on the merge route). ``fold`` None lets the cost model decide whether
    the dX GEMM makes v itself; ``out`` holds optional preallocated outputs."""
    m, k, n, r = _check_operands(x, weight, None, lora_A, lora_B)
    if grad_y.shape != (m, n) or grad_y.stride(-1) != 1 or grad_y.dtype != x.dtype:
        raise ValueError(
            f"grad_y must be {x.dtype} [{m}, {n}] with unit column stride, got {grad_y.dtype} {tuple(grad_y.shape)}"
        )
    out = out or LoraGrads()
    acc_a = torch.zeros(r, k, dtype=torch.float32, device=x.device)
    acc_b = torch.zeros(n, r, dtype=torch.float32, device=x.device)
    acc_bias = torch.zeros(n, dtype=torch.float32, device=x.device) if need_bias else None
    grad_x = _output(out.x, (m, k), x) if need_x else None
    if m > 0 and route is LinearRoute.MERGE:
        if dropout_p > 0:
            raise ValueError("the merge route computes no dropout; use the epilogue route")
        if need_x:
            torch.mm(grad_y, merged_weight(weight, lora_A, lora_B, scale), out=grad_x)
        u = torch.empty(m, r, dtype=torch.float32, device=x.device)  # made and used inside the kernel only
        _skinny_products(
            x,
            lora_A,
            grad_y,
            lora_B,
            u,
            None,
            acc_a,
            acc_b,
            acc_bias,
            scale,
            0.0,
            seed,
            compute_u=True,
            store_u=False,
            backward=True,
            configs=configs,
        )
    elif m > 0:
        if u is None or u.shape != (m, r) or u.dtype != torch.float32:
            raise ValueError("the epilogue route's backward needs the forward's u [M, r] float32")
        if fold is None:  # never folded on FMA units: it spills there (FMA_CONFIGS)
            fold = _dot_precision(x.dtype) != "ieee" and fold_rank_product(m, n, k, r, x.element_size())
        if need_x and fold:
            _grad_x(
                grad_y,
                weight,
                lora_A,
                lora_B,
                None,
                u,
                x,
                grad_x,
                acc_a,
                acc_b,
                acc_bias,
                scale,
                dropout_p,
                seed,
                fold_v=True,
                configs=configs,
            )
        else:
            v = torch.empty(m, r, dtype=torch.float32, device=x.device) if need_x else None
            _skinny_products(
                x,
                lora_A,
                grad_y,
                lora_B,
                u,
                v,
                acc_a,
                acc_b,
                acc_bias,
                scale,
                dropout_p,
                seed,
                compute_u=False,
                store_u=False,
                backward=True,
                configs=configs,
            )
            if need_x:
                _grad_x(
                    grad_y,
                    weight,
                    lora_A,
                    lora_B,
                    v,
                    u,
                    x,
                    grad_x,
                    acc_a,
                    acc_b,
                    None,
                    scale,
                    dropout_p,
                    seed,
                    fold_v=False,
                    configs=configs,
                )
    return LoraGrads(
        x=grad_x,
        lora_A=_cast_into(out.lora_A, acc_a, lora_A.dtype),
        lora_B=_cast_into(out.lora_B, acc_b, lora_B.dtype),
        bias=_cast_into(out.bias, acc_bias, x.dtype) if need_bias else None,
    )


def _cast_into(out: torch.Tensor | None, acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if out is None:
        return acc if acc.dtype == dtype else acc.to(dtype)
    return _output(out, acc.shape, acc, dtype).copy_(acc)


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """[..., C] → [rows, C] with unit column stride (a view where possible)."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


class LoraLinearFunction(torch.autograd.Function):
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ by one route; see the module docstring. Saves x's rows, u
    (epilogue route), W, A, B and the dropout seed; never an M×N tensor."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scale: float, dropout_p: float, route: LinearRoute, fold):
        x_rows = _as_rows(x)
        seed = draw_dropout_seed() if dropout_p > 0 else 0
        fold_forward = False if dropout_p > 0 else fold  # the mask is drawn in the separate shrink
        y, u = lora_linear_forward(x_rows, weight, bias, lora_A, lora_B, scale, dropout_p, seed, route, fold_forward)
        ctx.save_for_backward(x_rows, u, weight, lora_A, lora_B)
        ctx.scale, ctx.dropout_p, ctx.seed, ctx.route, ctx.fold = scale, dropout_p, seed, route, fold
        ctx.x_shape = x.shape
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y):
        x_rows, u, weight, lora_A, lora_B = ctx.saved_tensors
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        g = _as_rows(grad_y)
        with naming_kernel_failures("lora_linear backward", (g, x_rows, weight, lora_A, lora_B)):
            grads = lora_linear_backward(
                g,
                x_rows,
                u,
                weight,
                lora_A,
                lora_B,
                ctx.scale,
                ctx.dropout_p,
                ctx.seed,
                ctx.route,
                ctx.fold,
                need_x=need_x,
                need_bias=need_bias,
            )
        grad_x = grads.x.view(ctx.x_shape) if need_x else None
        grad_w = g.t() @ x_rows if need_w else None  # only when a user unfroze W (dW' = dW on the merge route)
        return grad_x, grad_w, grads.bias, grads.lora_A, grads.lora_B, None, None, None, None


def lora_linear(
    x,
    weight,
    bias,
    lora_A,
    lora_B,
    scale: float,
    dropout_p: float = 0.0,
    route: LinearRoute | None = None,
    fold: bool | None = None,
):
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ for x of any leading shape [..., K]; ``dropout_p`` is the
    active dropout probability (0 in eval mode). ``route`` and ``fold`` (make u and v inside the
    Triton GEMMs; the forward never does with dropout) default to :func:`default_route` and the
    cost model's fold choice (:func:`fold_rank_product`). float64 inputs run the
    reference op: Triton's kernels accumulate in float32 (an fp64 accumulator changes the loop
    carried type and does not compile), which would silently lose precision a float64 caller
    asked for."""
    if any(t is not None and t.dtype == torch.float64 for t in (x, weight, bias, lora_A, lora_B)):
        return reference.lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p)
    if route is None:
        route = default_route(x, weight, lora_A, dropout_p > 0)
    return LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scale), float(dropout_p), route, fold)
