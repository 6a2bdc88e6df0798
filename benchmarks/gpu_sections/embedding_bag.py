"""GPU section: the fused LoRA embedding bag (kernels/lora_embedding_bag.py).

First checks the fused op — output, sparse dA and dB, in the deterministic and the atomic dB
mode — against the reference op on CUDA (float64 oracle; dA bit for bit against the reference in
the same dtype) and raises on any mismatch, so nothing is timed then. Then times, side by side,
at V = 10,000,000, D = 128, r = 16, 65,536 bags of 32 ids (uniform and Zipf-skewed ids; fp32 and
bf16 tables, fp32 adapters):

    base        frozen nn.EmbeddingBag forward (F.embedding_bag): the floor
    unfused     F.embedding_bag on E + F.embedding_bag on A (sparse grad) + matmul, fwd+bwd
    fused       the fused op, forward + backward (deterministic dB, the default; and atomic)
    fused_fwd   the fused op, forward alone

Bytes that must move (the GB/s figures; ids int64, outputs fp32 with an fp32 adapter):
    forward    L·8 ids + L·D·e gathered rows of E + L·r·4 gathered rows of A + nb·D·o output
    backward   nb·D·4 read of dY + L·r·4 rows of the sparse dA written (dB is r×D: nothing)
The base forward moves the forward's bytes without the A rows. With Zipf ids most gathered rows
hit in L2, so their GB/s is an effective rate and may exceed the copy bandwidth.

Targets (H200): fused fwd+bwd ≤ 1.35x the base forward (fp32 table), ≤ 1.6x (bf16);
≥ 2x faster than unfused; fused forward at ≥ 60% of the measured copy bandwidth.
The layout (``bag_layout``) is built once outside the timings, as the op's input; its cost is
reported beside them (``layout_ms``).
"""

from __future__ import annotations

import sys
import time

import torch
import torch.nn.functional as F

from recpeft.kernels import bag_layout, dispatch, reference

from .common import bench_ms, check_close, print_table

FULL = dict(num_embeddings=10_000_000, dim=128, rank=16, num_bags=65_536, bag_len=32)
QUICK = dict(FULL, num_embeddings=1_000_000, num_bags=8_192)
SCALE = 2.0
ID_BYTES = 8  # int64 ids
ZIPF_MIX = 2_654_435_761  # odd, not a multiple of 5: a bijection of [0, V) for V = 10^k
TARGET_FWD_BWD_X_BASE = {torch.float32: 1.35, torch.bfloat16: 1.6}
TARGET_SPEEDUP_VS_UNFUSED = 2.0
TARGET_FWD_COPY_FRACTION = 0.60

# Check-stage tolerance against float64: fp32 sums of ≤ 40 ids per bag and ≤ 300 bags (dB) of
# randn-sized terms err by ≲ 1e-5 relative; a wrong index, weight or mask errs by O(1). bf16
# tables enter exactly (the oracle upcasts the same values) and the adapter is fp32.
CHECK_TOL = dict(rtol=1e-4, atol=1e-3)


def _fused_module():
    """The Triton module of the op, found the way dispatch finds it (ImportError naming the module
    when it does not import)."""
    return sys.modules[dispatch.triton_op("lora_embedding_bag").__module__]


# ---------------------------------------------------------------------------------------------
# Check
# ---------------------------------------------------------------------------------------------


def _check(fused) -> dict:
    """Fused op against the reference on CUDA: two small cases (sum with per-sample weights on an
    fp32 table; mean with padding on a bf16 table and fp32 adapter), odd D and r, empty bags."""
    g = torch.Generator(device="cuda").manual_seed(0)
    checked = []
    for name, table_dtype, mode, weighted, dim, rank in (
        ("fp32_sum_weighted", torch.float32, "sum", True, 100, 5),
        ("bf16_mean_padding", torch.bfloat16, "mean", False, 128, 16),
    ):
        V, nb = 5_000, 300
        lengths = torch.randint(0, 40, (nb,), device="cuda", generator=g)
        lengths[::17] = 0  # empty bags
        ids = torch.randint(0, V, (int(lengths.sum()),), device="cuda", generator=g)
        offsets = torch.cumsum(lengths, 0) - lengths
        psw = torch.rand(ids.numel(), device="cuda", generator=g) if weighted else None
        layout = bag_layout(
            ids,
            offsets,
            num_embeddings=V,
            mode=mode,
            per_sample_weights=psw,
            padding_idx=None if weighted else 3,
            weight_dtype=table_dtype,
        )
        E = torch.randn(V, dim, device="cuda", generator=g).to(table_dtype)
        A = torch.randn(V, rank, device="cuda", generator=g)
        B = torch.randn(rank, dim, device="cuda", generator=g)
        dy = torch.randn(nb, dim, device="cuda", generator=g)

        A64, B64 = A.double().requires_grad_(), B.double().requires_grad_()
        w64 = layout.weights.double() if layout.weights is not None else None
        layout64 = type(layout)(layout.ids, layout.bag_of_id, layout.offsets, w64, layout.num_bags)
        expected = reference.lora_embedding_bag(E.double(), layout64, A64, B64, SCALE)
        expected.backward(dy.double())

        grads_b = {}
        for deterministic in (True, False, True):
            A_f, B_f = A.clone().requires_grad_(), B.clone().requires_grad_()
            out = fused.lora_embedding_bag(E, layout, A_f, B_f, SCALE, deterministic=deterministic)
            out.backward(dy)
            mode_name = "deterministic" if deterministic else "atomic"
            check_close(f"{name} out ({mode_name})", out, expected, **CHECK_TOL)
            check_close(f"{name} dA rows ({mode_name})", A_f.grad._values(), A64.grad._values(), **CHECK_TOL)
            check_close(f"{name} dB ({mode_name})", B_f.grad, B64.grad, **CHECK_TOL)
            if not torch.equal(A_f.grad._indices(), layout.ids.unsqueeze(0)):
                raise AssertionError(f"{name}: dA indices are not the looked-up ids")
            grads_b.setdefault(deterministic, []).append(B_f.grad)
            if layout.weights is None or layout.weights.dtype == A.dtype:  # the reference can run
                A_r, B_r = A.clone().requires_grad_(), B.clone().requires_grad_()
                reference.lora_embedding_bag(E, layout, A_r, B_r, SCALE).backward(dy)
                if not torch.equal(A_f.grad._values(), A_r.grad._values()):
                    raise AssertionError(f"{name}: dA differs from the reference op's bits ({mode_name})")
        if not torch.equal(*grads_b[True]):
            raise AssertionError(f"{name}: deterministic dB differs between two runs")
        checked.append(name)
    return {"cases": checked, "passed": True}


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _ids(distribution: str, count: int, num_embeddings: int) -> torch.Tensor:
    """Uniform ids, or Zipf(≈1)-skewed: k = ⌊V^u⌋ − 1 with u uniform has P(k) ∝ 1/(k + 1); the
    ranks are then scattered over the table by a fixed bijection so hot rows are not adjacent."""
    if distribution == "uniform":
        return torch.randint(0, num_embeddings, (count,), device="cuda")
    u = torch.rand(count, device="cuda", dtype=torch.float64)
    rank = (float(num_embeddings) ** u).floor().long().clamp_(1, num_embeddings) - 1
    return (rank * ZIPF_MIX) % num_embeddings


def _bytes(shape: dict, table_dtype: torch.dtype) -> dict:
    L, nb, D, r = shape["num_bags"] * shape["bag_len"], shape["num_bags"], shape["dim"], shape["rank"]
    e = torch.tensor([], dtype=table_dtype).element_size()
    base = L * ID_BYTES + L * D * e + nb * D * e
    forward = L * ID_BYTES + L * D * e + L * r * 4 + nb * D * 4
    backward = nb * D * 4 + L * r * 4
    return {"base": base, "forward": forward, "fwd_bwd": forward + backward}


def _time_case(fused, shape, E, A, B, distribution, env) -> dict:
    V, nb, bag_len = shape["num_embeddings"], shape["num_bags"], shape["bag_len"]
    ids = _ids(distribution, nb * bag_len, V)
    offsets = torch.arange(0, nb * bag_len, bag_len, device="cuda")
    dy = torch.randn(nb, shape["dim"], device="cuda")

    torch.cuda.synchronize()
    started = time.perf_counter()
    layout = bag_layout(ids, offsets, num_embeddings=V, weight_dtype=E.dtype, validate=False)
    torch.cuda.synchronize()
    layout_ms = (time.perf_counter() - started) * 1e3

    def base():
        with torch.no_grad():
            F.embedding_bag(ids, E, offsets, mode="sum")

    def unfused():
        pooled_e = F.embedding_bag(ids, E, offsets, mode="sum")
        pooled_a = F.embedding_bag(ids, A, offsets, mode="sum", sparse=True)
        out = pooled_e + (pooled_a @ B) * SCALE
        torch.autograd.grad(out, (A, B), dy)

    def fused_fwd_bwd(deterministic):
        out = fused.lora_embedding_bag(E, layout, A, B, SCALE, deterministic=deterministic)
        torch.autograd.grad(out, (A, B), dy)

    def fused_fwd():
        with torch.no_grad():
            fused.lora_embedding_bag(E, layout, A, B, SCALE)

    ms = {
        "base": bench_ms(base),
        "unfused": bench_ms(unfused),
        "fused": bench_ms(lambda: fused_fwd_bwd(True)),
        "fused_atomic": bench_ms(lambda: fused_fwd_bwd(False)),
        "fused_fwd": bench_ms(fused_fwd),
    }
    nbytes = _bytes(shape, E.dtype)
    gbps = {
        "base": nbytes["base"] / ms["base"] / 1e6,
        "unfused": nbytes["fwd_bwd"] / ms["unfused"] / 1e6,
        "fused": nbytes["fwd_bwd"] / ms["fused"] / 1e6,
        "fused_atomic": nbytes["fwd_bwd"] / ms["fused_atomic"] / 1e6,
        "fused_fwd": nbytes["forward"] / ms["fused_fwd"] / 1e6,
    }
    row = {
        "table": str(E.dtype).removeprefix("torch."),
        "ids": distribution,
        "distinct_ids": torch.unique(ids).numel() / ids.numel(),
        "layout_ms": layout_ms,
        **{f"{k}_ms": v for k, v in ms.items()},
        **{f"{k}_gbps": v for k, v in gbps.items()},
        "fused_x_base": ms["fused"] / ms["base"],
        "fused_atomic_x_base": ms["fused_atomic"] / ms["base"],
        "fused_fwd_x_base": ms["fused_fwd"] / ms["base"],
        "unfused_x_base": ms["unfused"] / ms["base"],
        "speedup_vs_unfused": ms["unfused"] / ms["fused"],
        "base_copy_fraction": gbps["base"] / env["copy_gbps"],
        "fused_fwd_copy_fraction": gbps["fused_fwd"] / env["copy_gbps"],
        "bytes": nbytes,
    }
    row["meets"] = {
        "fwd_bwd_x_base": row["fused_x_base"] <= TARGET_FWD_BWD_X_BASE[E.dtype],
        "speedup_vs_unfused": row["speedup_vs_unfused"] >= TARGET_SPEEDUP_VS_UNFUSED,
        "fwd_copy_fraction": row["fused_fwd_copy_fraction"] >= TARGET_FWD_COPY_FRACTION,
    }
    return row


def run(env: dict, quick: bool) -> dict:
    fused = _fused_module()
    shape = QUICK if quick else FULL
    result = {
        "shape": shape,
        "scale": SCALE,
        "default_deterministic": fused.DETERMINISTIC_GRAD_B,
        "check": _check(fused),
        "rows": [],
    }
    V, D, r = shape["num_embeddings"], shape["dim"], shape["rank"]
    for table_dtype in (torch.float32, torch.bfloat16):
        # torch.empty + a fill on the device: a 10M×128 fp32 table is 5 GB
        E = torch.empty(V, D, device="cuda", dtype=table_dtype).uniform_(-1.0, 1.0)
        A = torch.empty(V, r, device="cuda").normal_(0.0, 0.02).requires_grad_()
        B = torch.empty(r, D, device="cuda").normal_(0.0, 1.0).requires_grad_()
        for distribution in ("uniform", "zipf"):
            result["rows"].append(_time_case(fused, shape, E, A, B, distribution, env))
        del E, A, B
        torch.cuda.empty_cache()

    print_table(
        f"LoRA embedding bag, V={V:,} D={D} r={r}, {shape['num_bags']:,} bags of {shape['bag_len']} "
        f"(copy {env['copy_gbps']:.0f} GB/s)",
        result["rows"],
        [
            "table",
            "ids",
            "base_ms",
            "unfused_ms",
            "fused_ms",
            "fused_atomic_ms",
            "fused_fwd_ms",
            "fused_x_base",
            "speedup_vs_unfused",
            "base_gbps",
            "fused_gbps",
            "fused_fwd_gbps",
            "fused_fwd_copy_fraction",
            "layout_ms",
        ],
    )
    result["targets"] = {
        "fwd_bwd_x_base": {str(k).removeprefix("torch."): v for k, v in TARGET_FWD_BWD_X_BASE.items()},
        "speedup_vs_unfused": TARGET_SPEEDUP_VS_UNFUSED,
        "fwd_copy_fraction": TARGET_FWD_COPY_FRACTION,
    }
    return result
