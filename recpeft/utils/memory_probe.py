"""Peak resident memory of a piece of work, measured by the process that does it (Linux /proc).

The process reads its resident set (``VmRSS`` in /proc/self/status), resets the high-water mark
``VmHWM`` to it by writing 5 to /proc/self/clear_refs, does the work and reads both again. Marks
are only sharp in a fresh process — earlier allocations blur them — so a probe runs in its own
subprocess, which prints its figures as one JSON line (:func:`run_json_subprocesses` starts them
and reads that line). glibc is told to serve blocks over ``MALLOC_MMAP_THRESHOLD`` bytes by mmap,
so that freed large blocks leave the resident set at once.

Example::

    if can_measure_memory():
        _, peak, retained = resident_growth(loss.backward)   # bytes above the resident set before
        figures = measure_peak_memory(build_model, train_one_step, steps=3)

Imports nothing but the standard library.
"""

from __future__ import annotations

import gc
import json
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

#: glibc serves blocks above this by mmap (``MALLOC_MMAP_THRESHOLD_``), so freed ones leave the resident set at once
MALLOC_MMAP_THRESHOLD = "131072"
STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")

T = TypeVar("T")
Built = TypeVar("Built")


def can_measure_memory() -> bool:
    """True where the resident-set high-water mark can be read and reset (Linux /proc)."""
    return CLEAR_REFS.exists() and STATUS.exists()


def resident_kib(field: str) -> int:
    """``field`` ("VmRSS" or "VmHWM") of /proc/self/status, in KiB."""
    match = re.search(rf"^{field}:\s+(\d+) kB", STATUS.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{STATUS} has no {field} line")
    return int(match.group(1))


def reset_high_water_mark() -> None:
    """VmHWM := VmRSS."""
    CLEAR_REFS.write_text("5")


def resident_growth(fn: Callable[[], T]) -> tuple[T, int, int]:
    """``(fn(), peak_bytes, retained_bytes)``: VmHWM during the call and VmRSS after it, each
    minus VmRSS before it (the mark is reset just before the call)."""
    before = resident_kib("VmRSS")
    reset_high_water_mark()
    result = fn()
    peak, after = resident_kib("VmHWM"), resident_kib("VmRSS")
    return result, (peak - before) * 1024, (after - before) * 1024


def measure_peak_memory(build: Callable[[], Built], step: Callable[[Built, int], object], steps: int) -> dict:
    """Resident-memory growth of ``built = build()`` and of ``step(built, i)`` for i < ``steps``,
    in this process, in bytes:

        peak_bytes       = VmHWM over the steps − VmRSS before building   (what the job holds)
        model_bytes      = VmRSS once built − VmRSS before building
        training_bytes   = peak_bytes − model_bytes
        build_peak_bytes = VmHWM while building − VmRSS before building

    and ``step_s_in_probe``, the mean seconds per step. Call it in a fresh process."""

    def collected_build() -> Built:
        built = build()
        gc.collect()
        return built

    def train() -> float:
        start = time.perf_counter()
        for i in range(steps):
            step(built, i)
        return (time.perf_counter() - start) / max(steps, 1)

    gc.collect()
    built, build_peak, model = resident_growth(collected_build)
    seconds, training, _ = resident_growth(train)
    return {
        "peak_bytes": model + training,
        "model_bytes": model,
        "training_bytes": training,
        "build_peak_bytes": build_peak,
        "step_s_in_probe": round(seconds, 4),
    }


def describe_peak_memory(steps: int) -> str:
    """One line saying how :func:`measure_peak_memory` run by :func:`run_json_subprocesses` measures."""
    return (
        f"fresh process per probe; VmHWM reset via /proc/self/clear_refs; peak = VmHWM over {steps} training "
        f"steps - VmRSS before building the model; build_peak = VmHWM while building; "
        f"MALLOC_MMAP_THRESHOLD_={MALLOC_MMAP_THRESHOLD}"
    )


def run_json_subprocesses(argvs: list[list[str]], timeout: float = 600) -> list[dict]:
    """Run every command of ``argvs`` at once, each with ``MALLOC_MMAP_THRESHOLD_`` set; the JSON
    object on the last stdout line of each, in order. Processes measure their own resident set, so
    running them side by side changes no figure, only the wall time. Raises RuntimeError with the
    end of a failed command's stderr (the others are stopped)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=MALLOC_MMAP_THRESHOLD)
    running = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv in argvs
    ]
    results = []
    try:
        for argv, process in zip(argvs, running):
            stdout, stderr = process.communicate(timeout=timeout)
            lines = stdout.strip().splitlines()
            if process.returncode != 0 or not lines:
                raise RuntimeError(f"{' '.join(argv[:5])} … failed (exit {process.returncode}):\n{stderr[-3000:]}")
            results.append(json.loads(lines[-1]))
    finally:
        for process in running:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results
