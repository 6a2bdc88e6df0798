"""What every GPU section shares: timing, the device's measured floors, checks and tables."""

from __future__ import annotations

import datetime

import torch
import triton
from triton.testing import do_bench


def bench_ms(fn, warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn()`` (triton.testing.do_bench, which flushes L2 between runs)."""
    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def _copy_gbps(numel: int) -> float:
    """GB/s of dst.copy_(src) for fp32 buffers of ``numel`` elements (bytes read + written)."""
    src = torch.empty(numel, dtype=torch.float32, device="cuda").uniform_()
    dst = torch.empty_like(src)
    return 2 * numel * 4 / bench_ms(lambda: dst.copy_(src)) / 1e6


def measure_device() -> dict:
    """Device name, versions, date, and the two floors: copy bandwidth (GB/s, read + write of a
    1 GiB buffer) and bf16 matrix rate (TFLOP/s, 8192³ torch.matmul)."""
    copy_gbps = _copy_gbps(1 << 28)
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm_ms = bench_ms(lambda: a @ b)
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gbps": copy_gbps,
        "bf16_tflops": 2 * n**3 / mm_ms / 1e9,
    }


def check_close(what: str, got: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float) -> None:
    """Raise AssertionError naming ``what`` unless ``got`` matches ``expected`` (float64 reference)."""
    try:
        torch.testing.assert_close(got.double(), expected.double(), rtol=rtol, atol=atol)
    except AssertionError as exc:
        raise AssertionError(f"{what}: {exc}") from None


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)
