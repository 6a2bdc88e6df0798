"""Fused LoRA embedding bag: the pooled lookup of a frozen table plus its rank-r delta, one pass.

Notation (DESIGN.md, "LoRA embedding bag"): E [V, D] frozen table, A [V, r] and B [r, D] the
adapter, s its scale. A :class:`~recpeft.kernels.bags.BagLayout` gives bag j its ids I_j (a
contiguous run of ``ids`` starting at ``offsets[j]``) and weights w_i (mean's 1/|I_j| and the
per-sample weights folded in; 1 when ``weights`` is None)::

    pooled_E_j = Σ_{i∈I_j} w_i·E[i]                 [D]   the frozen bag (skipped when the
                                                          caller passes its own base output)
    pooled_j   = Σ_{i∈I_j} w_i·A[i]                 [r]   pooled in rank space first
    out_j      = pooled_E_j + s·pooled_j·B          [D]

Backward, with dY_j the gradient of out_j (E is frozen and gets none)::

    g_j    = s·dY_j·Bᵀ                              [r]   per bag
    dA[i] += w_i·g_{bag(i)}     for every looked-up id i: a sparse COO gradient with one row
                                per id (indices = ids, values [L, r]); no dense V×r buffer
    dB     = s·Σ_j pooled_jᵀ·dY_j                   [r, D]

Kernels, one program each:

- forward: a run of consecutive bags × a D-tile, B's tile held in registers for the run. For
  each bag it gathers the rows of E and of A once (BLOCK_L ids at a time), pools both in fp32,
  multiplies the pooled rank vector by B (r·D multiply-adds; no ``tl.dot``, a single row is too
  small for one) and writes the bag's outputs once. It also writes pooled_j [nb, r] (fp32) for
  dB. The adapter adds about r/D of the gathered bytes.
- dA values: a block of ids. g = s·dY·Bᵀ is one small GEMM ([nb, D]·[D, r], run by torch with
  the reference op's very expression, so g is bit-identical to the reference's); the kernel
  gathers g_{bag(i)} and multiplies by w_i — the reference's single rounding — in one pass
  over [L, r]. The A-gradient therefore equals the reference's exactly, and needs no reduction:
  duplicate ids are separate rows of the COO tensor, summed by whoever coalesces it.
- dB: a run of bags × a D-tile: tl.dot(pooledᵀ, dY) over BLOCK_B bags at a time, fp32
  (``input_precision="ieee"``: TF32 would round the inputs to 10 mantissa bits). The sum over
  runs is the only reduction of the op. Two modes:
    deterministic (default): each run writes its own [r, D] partial; torch sums the partials in
      a fixed order. Bitwise identical across runs. Costs one extra launch and a
      P×r×D fp32 buffer (P ≤ DB_TARGET_PROGRAMS runs: 4 MB at r=16, D=128) — small beside the
      op's L×(D + r) gathered elements, which is why it is the default (the GPU suite times
      both: ``fused_ms`` and ``fused_atomic_ms``).
    atomic: each run adds its partial into one fp32 [r, D] buffer with tl.atomic_add. One
      launch, but the order of the adds (hence the last bits of dB) changes from run to run.
  Choose with the ``deterministic`` keyword, else ``$RECPEFT_DETERMINISTIC`` (1/0), else
  :data:`DETERMINISTIC_GRAD_B`.

Tables may be fp32, bf16 or fp16, A and B likewise (they share one dtype); ids int32 or int64.
Every sum accumulates in fp32. The output has the dtype ``table + delta`` has in torch (the
promotion of the table's and the adapter's dtypes), as the reference op returns. float64 inputs
go to the reference op: Triton's fp64 ``tl.dot`` is not available on every target.

Sources: DESIGN.md; the gather-and-pool loop follows torch's and FBGEMM's embedding-bag
kernels (a bag's rows gathered in blocks and pooled in registers); the split reduction for dB is the
usual split-K pattern (Triton tutorial 03) with a fixed-order second stage.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import reference
from .bags import BagLayout
from .failures import naming_kernel_failures
from .launch import DOT_MIN, INTERPRETING, padded_rank

# ---------------------------------------------------------------------------------------------
# Launch settings
# ---------------------------------------------------------------------------------------------

DETERMINISTIC_ENV = "RECPEFT_DETERMINISTIC"
# dB by a fixed-order two-stage sum: reproducible training for one extra tiny launch (see above).
DETERMINISTIC_GRAD_B = True

# DOT_MIN (the smallest tl.dot dimension), the rank padding and the interpreter flag are shared
# with the other op files: kernels/launch.py.
MAX_BLOCK_D = 256  # widest D-tile a forward program holds; wider tables take more tiles
MAX_BLOCK_L = 32  # ids gathered per step: 32 rows × 128 fp32 columns = 16 KB in flight
# Block sizes and program counts below are first estimates, not yet tuned on a GPU: the GPU
# suite (benchmarks/gpu_sections/embedding_bag.py) measures them against the frozen bag.
# Forward programs: one bag each until the batch has FORWARD_TARGET_PROGRAMS bags (≈ 15 waves of
# 4 resident programs on 132 SMs), then runs of up to MAX_BAGS_PER_PROGRAM bags, which load B
# (r·D·4 bytes, 8 KB at r=16, D=128) once per run: at 65,536 bags that is 64 MB of L2 reads
# instead of 512 MB, beside the 1 GB of gathered rows.
FORWARD_TARGET_PROGRAMS = 8192
MAX_BAGS_PER_PROGRAM = 8
IDS_PER_GRAD_A_PROGRAM = 128  # ids per dA-values program: [128, r] rows out, one coalesced store
BAGS_PER_DOT = 16  # BLOCK_B, the K dimension of the dB tl.dot (at least DOT_MIN)
# dB split: at most this many runs of bags (partials). A few waves on a 132-SM H100/H200; the
# partials stay under 4·r·D·DB_TARGET_PROGRAMS bytes (4 MB at r=16, D=128).
DB_TARGET_PROGRAMS = 512
NUM_WARPS_WIDE = 4  # D-tile of 128 or more
NUM_WARPS_NARROW = 2

_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Triton's interpreter casts fp32 → bf16 by truncation, the GPU rounds to nearest even; under the
# interpreter the kernels round by hand so that their bf16 results are the GPU's (and dA stays
# bit-identical to torch's).
ROUND_BF16_BY_HAND = INTERPRETING


@dataclass(frozen=True)
class LaunchSettings:
    """Block sizes of the three kernels for one call (all powers of two)."""

    block_d: int  # D-tile of the forward and dB kernels
    d_tiles: int  # D-tiles per bag: cdiv(D, block_d)
    block_r: int  # r padded to a power of two ≥ DOT_MIN (padded_rank)
    block_l: int  # ids per gather step in the forward
    bags_per_program: int  # consecutive bags per forward program
    num_warps: int


def launch_settings(dim: int, rank: int, num_ids: int, num_bags: int) -> LaunchSettings:
    """One heuristic for every launch: D-tile covers D up to MAX_BLOCK_D, r padded to ≥ 16 for
    tl.dot, and the gather step sized to the mean bag length (1 for plain lookups, at most
    MAX_BLOCK_L) so short bags do not load masked rows; and runs of consecutive bags per
    forward program once the batch fills FORWARD_TARGET_PROGRAMS programs, so that B is loaded
    once per run instead of once per bag."""
    block_d = max(DOT_MIN, min(triton.next_power_of_2(dim), MAX_BLOCK_D))
    block_r = padded_rank(rank)
    mean_len = triton.cdiv(num_ids, max(num_bags, 1))
    block_l = min(triton.next_power_of_2(max(mean_len, 1)), MAX_BLOCK_L)
    bags_per_program = max(1, min(num_bags // FORWARD_TARGET_PROGRAMS, MAX_BAGS_PER_PROGRAM))
    num_warps = NUM_WARPS_WIDE if block_d >= 128 else NUM_WARPS_NARROW
    return LaunchSettings(block_d, triton.cdiv(dim, block_d), block_r, block_l, bags_per_program, num_warps)


def grad_b_split(num_bags: int) -> tuple[int, int]:
    """(bags per run, number of runs) of the dB reduction: runs of a multiple of BAGS_PER_DOT
    bags, at most DB_TARGET_PROGRAMS of them. Depends on nb only, so the deterministic mode's
    summation order is fixed for a given batch shape."""
    per_run = triton.cdiv(triton.cdiv(num_bags, DB_TARGET_PROGRAMS), BAGS_PER_DOT) * BAGS_PER_DOT
    per_run = max(per_run, BAGS_PER_DOT)
    return per_run, triton.cdiv(num_bags, per_run)


def resolve_deterministic(deterministic: bool | None) -> bool:
    """The keyword, else $RECPEFT_DETERMINISTIC ("1"/"0"), else DETERMINISTIC_GRAD_B."""
    if deterministic is not None:
        return bool(deterministic)
    value = os.environ.get(DETERMINISTIC_ENV)
    if value is None or value == "":
        return DETERMINISTIC_GRAD_B
    if value not in ("0", "1"):
        raise ValueError(f"{DETERMINISTIC_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _cast(x, dtype: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr):
    """x (fp32) as ``dtype``; to bf16 by round-to-nearest-even on the bits when asked (finite x)."""
    if ROUND_BF16_BY_HAND and dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        y = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _lora_bag_forward_kernel(
    # pointers
    table_ptr,  # [V, D] frozen E; read only when GATHER_TABLE
    lora_a_ptr,  # [V, r]
    lora_b_ptr,  # [r, D]
    ids_ptr,  # [L] int32/int64, grouped by bag
    offsets_ptr,  # [nb] start of each bag in ids (int32/int64)
    weights_ptr,  # [L] w_i; read only when HAS_WEIGHTS
    base_ptr,  # [nb, D] caller's base output; read only when not GATHER_TABLE
    out_ptr,  # [nb, D] out_j
    pooled_ptr,  # [nb, r] fp32 pooled_j, saved for dB
    # sizes
    num_bags,
    num_ids,
    dim,
    rank,
    bags_per_program,  # each program pools a run of this many consecutive bags
    scale,
    # strides (rows; every last dimension is contiguous)
    stride_table,
    stride_a,
    stride_b,
    stride_base,
    stride_out,
    stride_pooled,
    # meta-parameters
    HAS_WEIGHTS: tl.constexpr,
    GATHER_TABLE: tl.constexpr,  # pool E here (True) or add the caller's base output (False)
    ROUND_BF16_BY_HAND: tl.constexpr,  # under the interpreter (see the constant)
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    run = tl.program_id(0).to(tl.int64)  # int64: bag·stride overflows int32 at big batches
    d_tile = tl.program_id(1)
    cols = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    # B [r, D-tile] stays in registers for the whole run of bags
    b = tl.load(
        lora_b_ptr + ranks[:, None] * stride_b + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0
    ).to(tl.float32)

    first_bag = run * bags_per_program
    for bag in range(first_bag, tl.minimum(first_bag + bags_per_program, num_bags)):
        start = tl.load(offsets_ptr + bag).to(tl.int64)
        end = tl.load(offsets_ptr + bag + 1, mask=bag + 1 < num_bags, other=num_ids).to(tl.int64)

        # fp32 sums over the bag's ids; a typical bag (≤ BLOCK_L ids) is one step of the loop
        acc_e = tl.zeros([BLOCK_D], dtype=tl.float32)
        pooled = tl.zeros([BLOCK_R], dtype=tl.float32)  # Σ w_i·A[i]
        for first in range(start, end, BLOCK_L):
            pos = first + tl.arange(0, BLOCK_L)
            in_bag = pos < end
            rows = tl.load(ids_ptr + pos, mask=in_bag, other=0).to(tl.int64)
            a = tl.load(
                lora_a_ptr + rows[:, None] * stride_a + ranks[None, :],
                mask=in_bag[:, None] & rank_ok[None, :],
                other=0.0,
            ).to(tl.float32)
            if HAS_WEIGHTS:
                w = tl.load(weights_ptr + pos, mask=in_bag, other=0.0).to(tl.float32)
                a = a * w[:, None]
            pooled += tl.sum(a, axis=0)
            if GATHER_TABLE:
                e = tl.load(
                    table_ptr + rows[:, None] * stride_table + cols[None, :],
                    mask=in_bag[:, None] & col_ok[None, :],
                    other=0.0,
                ).to(tl.float32)
                if HAS_WEIGHTS:
                    e = e * w[:, None]
                acc_e += tl.sum(e, axis=0)

        delta = tl.sum(pooled[:, None] * b, axis=0) * scale  # [BLOCK_D] s·pooled·B
        if GATHER_TABLE:
            result = acc_e + delta
        else:
            result = tl.load(base_ptr + bag * stride_base + cols, mask=col_ok, other=0.0).to(tl.float32) + delta
        tl.store(
            out_ptr + bag * stride_out + cols, _cast(result, out_ptr.dtype.element_ty, ROUND_BF16_BY_HAND), mask=col_ok
        )
        if d_tile == 0:  # every D-tile pooled the same A rows; one writes them
            tl.store(pooled_ptr + bag * stride_pooled + ranks, pooled, mask=rank_ok)


@triton.jit
def _lora_bag_grad_a_kernel(
    # pointers
    per_bag_ptr,  # [nb, r] g_j = s·dY_j·Bᵀ
    bag_of_id_ptr,  # [L] bag of each id
    weights_ptr,  # [L] w_i; read only when HAS_WEIGHTS
    values_ptr,  # [L, r] out: w_i·g_{bag(i)}
    # sizes
    num_ids,
    rank,
    # strides (rows)
    stride_per_bag,
    stride_values,
    # meta-parameters
    HAS_WEIGHTS: tl.constexpr,
    ROUND_BF16_BY_HAND: tl.constexpr,
    BLOCK_IDS: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64) * BLOCK_IDS + tl.arange(0, BLOCK_IDS)
    ok = pos < num_ids
    ranks = tl.arange(0, BLOCK_R)
    mask = ok[:, None] & (ranks < rank)[None, :]
    bags = tl.load(bag_of_id_ptr + pos, mask=ok, other=0).to(tl.int64)
    g = tl.load(per_bag_ptr + bags[:, None] * stride_per_bag + ranks[None, :], mask=mask, other=0.0)
    if HAS_WEIGHTS:
        # One product rounded once, as torch's rows.mul_(w): the product of two fp32 numbers
        # rounded to fp32, or of two 16-bit floats (exact in fp32) rounded to 16 bits.
        w = tl.load(weights_ptr + pos, mask=ok, other=0.0).to(tl.float32)
        g = _cast(g.to(tl.float32) * w[:, None], values_ptr.dtype.element_ty, ROUND_BF16_BY_HAND)
    tl.store(values_ptr + pos[:, None] * stride_values + ranks[None, :], g, mask=mask)


@triton.jit
def _lora_bag_grad_b_kernel(
    # pointers
    pooled_ptr,  # [nb, r] fp32 pooled_j
    grad_ptr,  # [nb, D] dY
    partial_ptr,  # deterministic: [P, r, D] fp32 partials; atomic: [r, D] fp32 zeros
    # sizes
    num_bags,
    dim,
    rank,
    bags_per_program,  # a multiple of BLOCK_B
    scale,
    # strides (rows)
    stride_pooled,
    stride_grad,
    # meta-parameters
    ATOMIC: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    run = tl.program_id(0)
    d_tile = tl.program_id(1)
    cols = d_tile * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    ranks = tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank

    first = run.to(tl.int64) * bags_per_program
    last = tl.minimum(first + bags_per_program, num_bags)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for b0 in range(first, last, BLOCK_B):
        bags = b0 + tl.arange(0, BLOCK_B)
        ok = bags < last
        pooled_t = tl.load(
            pooled_ptr + bags[None, :] * stride_pooled + ranks[:, None], mask=rank_ok[:, None] & ok[None, :], other=0.0
        )  # [BLOCK_R, BLOCK_B]
        dy = tl.load(
            grad_ptr + bags[:, None] * stride_grad + cols[None, :], mask=ok[:, None] & col_ok[None, :], other=0.0
        ).to(tl.float32)  # [BLOCK_B, BLOCK_D]
        acc = tl.dot(pooled_t, dy, acc, input_precision="ieee")
    acc = acc * scale

    tile = ranks[:, None] * dim + cols[None, :]
    mask = rank_ok[:, None] & col_ok[None, :]
    if ATOMIC:
        tl.atomic_add(partial_ptr + tile, acc, mask=mask)
    else:
        tl.store(partial_ptr + run.to(tl.int64) * rank * dim + tile, acc, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _check_inputs(table, lora_A, lora_B, ids, offsets, weights, base_output):
    num_embeddings, dim = table.shape
    if lora_A.dim() != 2 or lora_A.shape[0] != num_embeddings:
        raise ValueError(f"lora_A must be [V={num_embeddings}, r], got {tuple(lora_A.shape)}")
    rank = lora_A.shape[1]
    if tuple(lora_B.shape) != (rank, dim):
        raise ValueError(f"lora_B must be [r={rank}, D={dim}], got {tuple(lora_B.shape)}")
    if lora_A.dtype != lora_B.dtype:
        raise TypeError(f"lora_A and lora_B must share a dtype, got {lora_A.dtype} and {lora_B.dtype}")
    for name, t in (("table", table), ("lora_A", lora_A)):
        if t.dtype not in _TRITON_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16 or float16 here, got {t.dtype}")
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be 1-D int32 or int64, got {ids.dtype} of shape {tuple(ids.shape)}")
    if offsets.dim() != 1:
        raise ValueError(f"offsets must be 1-D, got shape {tuple(offsets.shape)}")
    if weights is not None and tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"weights must be [L={ids.numel()}], got {tuple(weights.shape)}")
    if base_output is not None and tuple(base_output.shape) != (offsets.numel(), dim):
        raise ValueError(f"base_output must be [nb={offsets.numel()}, D={dim}], got {tuple(base_output.shape)}")
    devices = {t.device for t in (table, lora_A, lora_B, ids, offsets, weights, base_output) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _rows_contiguous(t: torch.Tensor | None) -> torch.Tensor | None:
    """t with a contiguous last dimension (a no-op for the usual tables)."""
    if t is None or t.dim() == 0 or t.stride(-1) == 1:
        return t
    return t.contiguous()


def lora_embedding_bag_forward(
    table, lora_A, lora_B, ids, offsets, weights, scale: float, base_output=None, *, out=None, pooled=None
):
    """out_j = (base_output_j or Σ w_i·E[i]) + s·(Σ w_i·A[i])·B and pooled_j = Σ w_i·A[i].

    Shapes: table [V, D], lora_A [V, r], lora_B [r, D], ids/weights [L], offsets [nb],
    base_output [nb, D]. ``out`` [nb, D] (the promoted dtype) and ``pooled`` [nb, r] fp32 may be
    preallocated; every element of both is written. Returns (out, pooled).
    """
    _check_inputs(table, lora_A, lora_B, ids, offsets, weights, base_output)
    table, lora_A, lora_B, base_output = map(_rows_contiguous, (table, lora_A, lora_B, base_output))
    ids, offsets = ids.contiguous(), offsets.contiguous()
    weights = weights.contiguous() if weights is not None else None
    num_bags, (_, dim), rank = offsets.numel(), table.shape, lora_A.shape[1]
    base_dtype = table.dtype if base_output is None else base_output.dtype
    out_dtype = torch.promote_types(base_dtype, lora_A.dtype)
    if out is None:
        out = torch.empty(num_bags, dim, dtype=out_dtype, device=table.device)
    if pooled is None:
        pooled = torch.empty(num_bags, rank, dtype=torch.float32, device=table.device)
    if tuple(out.shape) != (num_bags, dim) or out.dtype != out_dtype or out.stride(-1) != 1:
        raise ValueError(f"out must be a row-contiguous [{num_bags}, {dim}] {out_dtype} tensor")
    if tuple(pooled.shape) != (num_bags, rank) or pooled.dtype != torch.float32 or not pooled.is_contiguous():
        raise ValueError(f"pooled must be a contiguous [{num_bags}, {rank}] float32 tensor")
    if num_bags == 0:
        return out, pooled

    cfg = launch_settings(dim, rank, ids.numel(), num_bags)
    base = base_output if base_output is not None else out  # placeholder pointer, never read
    _lora_bag_forward_kernel[(triton.cdiv(num_bags, cfg.bags_per_program), cfg.d_tiles)](
        table,
        lora_A,
        lora_B,
        ids,
        offsets,
        weights if weights is not None else ids,
        base,
        out,
        pooled,
        num_bags,
        ids.numel(),
        dim,
        rank,
        cfg.bags_per_program,
        float(scale),
        table.stride(0),
        lora_A.stride(0),
        lora_B.stride(0),
        base.stride(0),
        out.stride(0),
        pooled.stride(0),
        HAS_WEIGHTS=weights is not None,
        GATHER_TABLE=base_output is None,
        ROUND_BF16_BY_HAND=ROUND_BF16_BY_HAND,
        BLOCK_L=cfg.block_l,
        BLOCK_D=cfg.block_d,
        BLOCK_R=cfg.block_r,
        num_warps=cfg.num_warps,
    )
    return out, pooled


def lora_embedding_bag_backward(
    grad_out,
    pooled,
    lora_B,
    bag_of_id,
    weights,
    scale: float,
    *,
    need_grad_a: bool = True,
    need_grad_b: bool = True,
    deterministic: bool | None = None,
    grad_a_values=None,
    grad_b=None,
):
    """(values [L, r] of the sparse dA, dB [r, D]); either is None when not needed.

    values_i = w_i·g_{bag(i)} with g = s·dY·Bᵀ (see the module docstring); dB = s·pooledᵀ·dY in
    the mode :func:`resolve_deterministic` picks. ``grad_a_values`` [L, r] (dtype of g) and
    ``grad_b`` [r, D] (B's dtype) may be preallocated; every element is written.
    """
    num_bags, dim = grad_out.shape
    rank = lora_B.shape[0]
    if tuple(pooled.shape) != (num_bags, rank) or tuple(lora_B.shape) != (rank, dim):
        raise ValueError(
            f"grad_out {tuple(grad_out.shape)}, pooled {tuple(pooled.shape)} and "
            f"lora_B {tuple(lora_B.shape)} do not fit [nb, D], [nb, r], [r, D]"
        )
    cfg = launch_settings(dim, rank, bag_of_id.numel(), num_bags)
    values = None
    if need_grad_a:
        # The reference op's own expression on the same (not re-laid-out) grad_out, so that g —
        # and with it dA — is bit-identical to the reference's.
        per_bag = (grad_out.to(lora_B.dtype) @ lora_B.t()).mul_(scale)  # [nb, r]
        num_ids = bag_of_id.numel()
        values = (
            grad_a_values
            if grad_a_values is not None
            else torch.empty(num_ids, rank, dtype=per_bag.dtype, device=grad_out.device)
        )
        if tuple(values.shape) != (num_ids, rank) or values.dtype != per_bag.dtype or not values.is_contiguous():
            raise ValueError(f"grad_a_values must be a contiguous [{num_ids}, {rank}] {per_bag.dtype} tensor")
        if num_ids:
            weights_arg = weights.contiguous() if weights is not None else bag_of_id
            _lora_bag_grad_a_kernel[(triton.cdiv(num_ids, IDS_PER_GRAD_A_PROGRAM),)](
                per_bag,
                bag_of_id.contiguous(),
                weights_arg,
                values,
                num_ids,
                rank,
                per_bag.stride(0),
                values.stride(0),
                HAS_WEIGHTS=weights is not None,
                ROUND_BF16_BY_HAND=ROUND_BF16_BY_HAND,
                BLOCK_IDS=IDS_PER_GRAD_A_PROGRAM,
                BLOCK_R=cfg.block_r,
            )
    result_b = None
    if need_grad_b:
        result_b = grad_b if grad_b is not None else torch.empty(rank, dim, dtype=lora_B.dtype, device=grad_out.device)
        if tuple(result_b.shape) != (rank, dim) or result_b.dtype != lora_B.dtype:
            raise ValueError(f"grad_b must be a [{rank}, {dim}] {lora_B.dtype} tensor")
        if num_bags == 0:
            return values, result_b.zero_()
        grad_out = grad_out.contiguous()
        atomic = not resolve_deterministic(deterministic)
        per_run, runs = grad_b_split(num_bags)
        if atomic:
            partial = torch.zeros(rank, dim, dtype=torch.float32, device=grad_out.device)
        else:
            partial = torch.empty(runs, rank, dim, dtype=torch.float32, device=grad_out.device)
        _lora_bag_grad_b_kernel[(runs, cfg.d_tiles)](
            pooled,
            grad_out,
            partial,
            num_bags,
            dim,
            rank,
            per_run,
            float(scale),
            pooled.stride(0),
            grad_out.stride(0),
            ATOMIC=atomic,
            BLOCK_B=BAGS_PER_DOT,
            BLOCK_D=cfg.block_d,
            BLOCK_R=cfg.block_r,
            num_warps=cfg.num_warps,
        )
        result_b.copy_(partial if atomic else partial.sum(0))  # fixed-order second stage
    return values, result_b


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------


class LoraEmbeddingBagFunction(torch.autograd.Function):
    """out = (base_output or the pooled E) + s·(Σ w_i·A[i])·B; sparse gradient for A, dense for
    B, identity for base_output, none for E, the layout or the weights."""

    @staticmethod
    def forward(
        ctx, table, lora_A, lora_B, ids, bag_of_id, offsets, weights, base_output, scale: float, deterministic: bool
    ):
        out, pooled = lora_embedding_bag_forward(table, lora_A, lora_B, ids, offsets, weights, scale, base_output)
        ctx.save_for_backward(ids, bag_of_id, weights, pooled, lora_B)
        ctx.scale, ctx.deterministic, ctx.table_shape = scale, deterministic, tuple(lora_A.shape)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        ids, bag_of_id, weights, pooled, lora_B = ctx.saved_tensors
        need_a, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        with naming_kernel_failures("lora_embedding_bag backward", (grad_out, pooled, lora_B, ids)):
            values, grad_b = lora_embedding_bag_backward(
                grad_out,
                pooled,
                lora_B,
                bag_of_id,
                weights,
                ctx.scale,
                need_grad_a=need_a,
                need_grad_b=need_b,
                deterministic=ctx.deterministic,
            )
        grad_a = None
        if need_a:
            indices = ids.to(torch.int64).unsqueeze(0)
            grad_a = torch.sparse_coo_tensor(indices, values, ctx.table_shape, check_invariants=False)
        grad_base = grad_out if ctx.needs_input_grad[7] else None
        return None, grad_a, grad_b, None, None, None, None, grad_base, None, None


def lora_embedding_bag(
    table, layout: BagLayout, lora_A, lora_B, scale: float, base_output=None, *, deterministic: bool | None = None
):
    """out_j = Σ w_i·E[i] + s·(Σ w_i·A[i])·B over ``layout``: [nb, D], as
    :func:`recpeft.kernels.reference.lora_embedding_bag`.

    With ``base_output`` [nb, D] given, returns base_output + delta and never reads E; without
    it, pools E in the same pass as A. The ids are not range-checked here (``bag_layout`` does
    that); an id outside [0, V) reads arbitrary memory. ``deterministic`` picks dB's reduction
    (module docstring). Two cases keep E's pooling in torch so that autograd sees it: a table
    or weights that require grad (E gets its gradient then, as in the reference op).
    float64 inputs run the reference op.
    """
    if torch.float64 in (table.dtype, lora_A.dtype, lora_B.dtype) or (
        base_output is not None and base_output.dtype == torch.float64
    ):
        return reference.lora_embedding_bag(table, layout, lora_A, lora_B, scale, base_output)
    weights = layout.weights
    if (
        base_output is None
        and torch.is_grad_enabled()
        and (table.requires_grad or (weights is not None and weights.requires_grad))
    ):
        base_output = (
            F.embedding_bag(layout.ids, table, layout.offsets, mode="sum", per_sample_weights=weights)
            if layout.num_bags
            else table.new_zeros(0, table.shape[1])
        )
    if weights is not None:
        weights = weights.detach()
    return LoraEmbeddingBagFunction.apply(
        table.detach(),
        lora_A,
        lora_B,
        layout.ids,
        layout.bag_of_id,
        layout.offsets,
        weights,
        base_output,
        float(scale),
        resolve_deterministic(deterministic),
    )
