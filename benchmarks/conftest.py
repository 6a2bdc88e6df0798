"""Shared machinery of the CPU benchmark suites (pytest-benchmark).

Each ``bench_*.py`` module declares a ``SUITE`` dict (name, shape, floor variant, targets) and a
module-scoped ``case`` fixture that builds every variant and checks that they compute the same
thing *before* anything is timed. The module-scoped ``report`` fixture defined here collects the
medians of every variant, prints a table of medians and ratios to the floor when the module ends,
and writes the figures to ``benchmarks/results/cpu_<name>.json``.

Two timings are reported per variant:

- ``median_ms``: pytest-benchmark's median (``benchmark.pedantic``, one variant after another).
- ``interleaved_median_ms``: the median over rounds in which every variant runs once, round-robin.
  On a shared machine the load changes over a run; interleaving exposes every variant to the same
  load, so its *ratios* are the more trustworthy of the two. Both are printed and saved.

Speed targets are reported (``met: true/false``), never asserted: a benchmark fails only when a
variant computes something wrong.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
    """What the figures were measured on."""
    return {
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "processor": platform.processor(),
        "cpu_model": _cpu_model(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


class Variant:
    """One measured computation: ``run()`` is timed, ``reset()`` (untimed) runs before each call
    (it clears gradients)."""

    def __init__(self, label: str, run: Callable[[], object], reset: Callable[[], None] | None = None):
        self.label = label
        self.run = run
        self.reset = reset or (lambda: None)


class BenchReport:
    """Medians of every variant of one suite, their ratios to the floor, and the JSON file."""

    def __init__(self, suite: dict):
        self.suite = suite
        self.floor = suite["floor"]
        self.medians: dict[str, float] = {}
        self.iqrs: dict[str, float] = {}
        self.rounds: dict[str, int] = {}
        self.interleaved: dict[str, float] = {}
        self.interleaved_rounds = 0
        self.extra: dict = {}
        self.labels: dict[str, str] = {}
        self.load_start = _loadavg()

    # ---- collecting ------------------------------------------------------------------------

    def time(self, benchmark, name: str, variant: Variant, rounds: int, warmup_rounds: int = 2) -> None:
        """Time ``variant`` with pytest-benchmark and keep its median (seconds)."""
        benchmark.group = self.suite["name"]
        benchmark.extra_info["variant"] = variant.label
        benchmark.pedantic(variant.run, setup=variant.reset, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        self.labels[name] = variant.label
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        self.medians[name] = stats.stats.median
        self.iqrs[name] = stats.stats.iqr
        self.rounds[name] = stats.stats.rounds

    def time_interleaved(self, variants: dict[str, Variant], rounds: int, warmup_rounds: int = 1) -> None:
        """Round-robin: every round runs each variant once; keep each variant's median."""
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(warmup_rounds + rounds):
            for name, variant in variants.items():
                variant.reset()
                start = time.perf_counter()
                variant.run()
                elapsed = time.perf_counter() - start
                if i >= warmup_rounds:
                    samples[name].append(elapsed)
        for name, values in samples.items():
            self.labels.setdefault(name, variants[name].label)
            self.interleaved[name] = statistics.median(values)
        self.interleaved_rounds = rounds

    # ---- reporting -------------------------------------------------------------------------

    @staticmethod
    def _ratios(medians: dict[str, float], floor: str) -> dict[str, float]:
        if floor not in medians:
            return {}
        return {name: value / medians[floor] for name, value in medians.items()}

    def targets(self) -> list[dict]:
        """Each target ``(variant, max ratio to the floor)`` with the measured ratios."""
        rows = []
        pedantic = self._ratios(self.medians, self.floor)
        interleaved = self._ratios(self.interleaved, self.floor)
        for name, limit in self.suite.get("targets", {}).items():
            row = {"ratio": f"{name}/{self.floor}", "target_max": limit,
                   "measured": pedantic.get(name), "measured_interleaved": interleaved.get(name)}
            measured = [v for v in (row["measured"], row["measured_interleaved"]) if v is not None]
            row["met"] = bool(measured) and all(v <= limit for v in measured)
            rows.append(row)
        return rows

    def table(self) -> str:
        pedantic = self._ratios(self.medians, self.floor)
        interleaved = self._ratios(self.interleaved, self.floor)
        names = list(dict.fromkeys(list(self.medians) + list(self.interleaved)))
        width = max([len(self.labels.get(n, n)) for n in names] + [10])

        def cell(values: dict, name: str, scale: float, fmt: str) -> str:
            return format(values[name] * scale, fmt) if name in values else "-"

        lines = [f"\n== {self.suite['title']} ==",
                 f"{'variant':<{width}}  {'median ms':>10}  {'x floor':>8}  {'interleaved ms':>14}  {'x floor':>8}"]
        for name in names:
            lines.append(
                f"{self.labels.get(name, name):<{width}}  {cell(self.medians, name, 1e3, '.2f'):>10}"
                f"  {cell(pedantic, name, 1, '.3f'):>8}  {cell(self.interleaved, name, 1e3, '.2f'):>14}"
                f"  {cell(interleaved, name, 1, '.3f'):>8}"
            )
        for row in self.targets():
            got = ", ".join(f"{v:.3f}x" for v in (row["measured"], row["measured_interleaved"]) if v is not None)
            lines.append(f"target {row['ratio']} <= {row['target_max']}x: measured {got or '-'} -> "
                         f"{'MET' if row['met'] else 'NOT MET'}")
        for key, value in self.suite.get("anchors", {}).items():
            lines.append(f"anchor: {key}: {value}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        ms = lambda d: {k: round(v * 1e3, 4) for k, v in d.items()}  # noqa: E731
        return {
            "suite": self.suite["name"],
            "title": self.suite["title"],
            "shape": self.suite["shape"],
            "dtype": self.suite.get("dtype", "float32"),
            "floor": self.floor,
            "variants": self.labels,
            "median_ms": ms(self.medians),
            "iqr_ms": ms(self.iqrs),
            "rounds": self.rounds,
            "ratios": {k: round(v, 4) for k, v in self._ratios(self.medians, self.floor).items()},
            "interleaved_median_ms": ms(self.interleaved),
            "interleaved_ratios": {k: round(v, 4) for k, v in self._ratios(self.interleaved, self.floor).items()},
            "interleaved_rounds": self.interleaved_rounds,
            "targets": self.targets(),
            "anchors": self.suite.get("anchors", {}),
            "loadavg_start": self.load_start,
            "loadavg_end": _loadavg(),
            **machine_info(),
            **self.extra,
        }

    def finish(self) -> None:
        if not self.medians and not self.interleaved and not self.extra:
            return  # nothing measured (deselected or --benchmark-disable)
        print(self.table())
        for key, value in self.extra.items():
            print(f"{key}: {json.dumps(value)}")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"cpu_{self.suite['name']}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


@pytest.fixture(scope="module")
def report(request):
    """The module's :class:`BenchReport` (from its ``SUITE``); prints and saves at module end."""
    bench_report = BenchReport(request.module.SUITE)
    yield bench_report
    bench_report.finish()


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """max |got − expected| ≤ tol · max |expected| (sparse tensors are compared densely), with a
    message naming the compared quantity and its error."""
    got, expected = got.detach(), expected.detach()
    if got.is_sparse:
        got = got.coalesce().to_dense()
    if expected.is_sparse:
        expected = expected.coalesce().to_dense()
    assert got.shape == expected.shape, f"{name}: shape {tuple(got.shape)} != {tuple(expected.shape)}"
    err = (got.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item()
    if not err <= tol * scale:
        raise AssertionError(f"{name}: variants disagree: max abs error {err:.3e} > {tol} x max |value| {scale:.3e}")


def skip_if_not_timing(config) -> None:
    """Skip a hand-timed test (interleaved rounds, memory probes) under --benchmark-disable/-skip."""
    if config.getoption("benchmark_disable", False) or config.getoption("benchmark_skip", False):
        pytest.skip("benchmarks disabled")


@pytest.fixture(scope="session")
def bench():
    """The helpers above, for the bench modules (a rootless conftest is not importable by name
    when tests/ is collected in the same run)."""
    return SimpleNamespace(Variant=Variant, assert_close=assert_close, skip_if_not_timing=skip_if_not_timing)
