"""Shared machinery of the CPU benchmark suites (pytest-benchmark).

Each ``bench_*.py`` module declares a ``SUITE`` dict (name, shape, floor variant, targets) and a
module-scoped ``case`` fixture that builds every variant and checks that they compute the same
thing *before* anything is timed. The module-scoped ``report`` fixture defined here collects the
medians of every variant, prints a table of medians and ratios to the floor when the module ends,
and writes the figures to ``benchmarks/results/cpu_<name>.json``.

Three timings are reported per variant:

- ``median_ms``: pytest-benchmark's median (``benchmark.pedantic``, one variant after another).
- ``interleaved_median_ms``: rounds in which every variant runs once, round-robin, keeping only
  *quiet* rounds (below). Every variant sees the same machine state, so these ratios are the
  ones the targets are judged on.
- ``interleaved_min_ms``: the fastest interleaved round of each variant. Noise only adds time,
  so on a busy machine the minima stay near the idle-machine figures when the medians do not.

Contention. The development machine's 2 cores are shared with other jobs. When another job holds
a core, every op that torch splits over 2 threads waits for the descheduled thread at its
barrier: a 1 MB elementwise op goes from ~0.02 ms to ~5 ms. The penalty is per op, not per byte,
so it wrecks ratios between variants with different op counts. A *probe* (a 1 MB multiply, best
of 3) runs before every variant of an interleaved round and after the last; a round counts only
when all its probes stay under ``QUIET_FACTOR`` × the fastest probe seen (+50 µs). The probe sees
CPU contention, not memory-bandwidth contention, so repeated runs still differ by several
percent. The probe before and after each pytest-benchmark test is saved too, so a contended
pedantic figure can be recognised. ``RECPEFT_BENCH_THREADS=1`` runs everything on one thread (no
barriers: contention then slows every op alike, but the probe no longer detects it).

Speed targets are reported (``met: true/false``), never asserted: a benchmark fails only when a
variant computes something wrong (or, for memory, when memory grows where it must not).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

RESULTS_DIR = Path(__file__).parent / "results"
THREADS_ENV = "RECPEFT_BENCH_THREADS"
QUIET_FACTOR = 10.0
QUIET_SLACK_S = 50e-6


def pytest_configure(config):
    threads = os.environ.get(THREADS_ENV)
    if threads:
        torch.set_num_threads(int(threads))


# ---- what the figures were measured on -------------------------------------------------------


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
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def machine_info() -> dict:
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


class ContentionProbe:
    """Seconds one small parallel op takes (best of ``repeats``): ~20 µs on an idle 2-core
    machine, milliseconds when another job holds a core."""

    def __init__(self):
        self.a = torch.rand(4096, 64)
        self.out = torch.empty_like(self.a)

    def __call__(self, repeats: int = 3) -> float:
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mul(self.a, self.a, out=self.out)
            best = min(best, time.perf_counter() - start)
        return best


# ---- measuring -------------------------------------------------------------------------------


class Variant:
    """One measured computation: ``run()`` is timed; ``reset()`` (untimed) runs before each call
    and clears gradients."""

    def __init__(self, label: str, run: Callable[[], object], reset: Callable[[], None] | None = None):
        self.label = label
        self.run = run
        self.reset = reset or (lambda: None)


class BenchReport:
    """Medians of every variant of one suite, their ratios to the floor, and the JSON file."""

    def __init__(self, suite: dict):
        self.suite = suite
        self.floor = suite["floor"]
        self.labels: dict[str, str] = {}
        self.medians: dict[str, float] = {}
        self.iqrs: dict[str, float] = {}
        self.rounds: dict[str, int] = {}
        self.probes: dict[str, list[float]] = {}
        self.interleaved: dict[str, float] = {}
        self.interleaved_min: dict[str, float] = {}
        self.interleaved_info: dict = {}
        self.extra: dict = {}
        self.load_start = _loadavg()
        self.probe = ContentionProbe()

    def time(self, benchmark, name: str, variant: Variant, rounds: int, warmup_rounds: int = 2) -> None:
        """Time ``variant`` with pytest-benchmark (pedantic, one call per round) and keep its
        median, with the contention probe before and after."""
        benchmark.group = self.suite["name"]
        benchmark.extra_info["variant"] = variant.label
        self.labels[name] = variant.label
        before = self.probe()
        benchmark.pedantic(variant.run, setup=variant.reset, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable: ran once, nothing measured
            return
        self.probes[name] = [before, self.probe()]
        self.medians[name] = stats.stats.median
        self.iqrs[name] = stats.stats.iqr
        self.rounds[name] = stats.stats.rounds

    def time_interleaved(
        self, variants: dict[str, Variant], rounds: int, warmup_rounds: int = 1, max_rounds_factor: int = 4
    ) -> None:
        """Round-robin rounds (each variant once per round) until ``rounds`` quiet ones are in or
        ``max_rounds_factor`` × ``rounds`` have run; keep each variant's median over the quiet
        rounds (over all rounds, flagged ``contended``, when fewer than half were quiet)."""
        for _ in range(warmup_rounds):
            for variant in variants.values():
                variant.reset()
                variant.run()
        all_rounds: list[tuple[float, dict[str, float]]] = []  # (slowest probe, times)
        best_probe = math.inf
        quiet = 0
        for _ in range(max_rounds_factor * rounds):
            probes, times = [], {}
            for name, variant in variants.items():
                variant.reset()
                probes.append(self.probe())
                start = time.perf_counter()
                variant.run()
                times[name] = time.perf_counter() - start
            probes.append(self.probe())
            best_probe = min(best_probe, *probes)
            all_rounds.append((max(probes), times))
            limit = QUIET_FACTOR * best_probe + QUIET_SLACK_S
            quiet = sum(1 for probe, _ in all_rounds if probe <= limit)
            if quiet >= rounds:
                break
        limit = QUIET_FACTOR * best_probe + QUIET_SLACK_S
        kept = [times for probe, times in all_rounds if probe <= limit]
        contended = len(kept) < max(rounds // 2, 1)
        if contended:
            kept = [times for _, times in all_rounds]
        for name in variants:
            self.labels.setdefault(name, variants[name].label)
            self.interleaved[name] = statistics.median(t[name] for t in kept)
            self.interleaved_min[name] = min(t[name] for _, t in all_rounds)
        self.interleaved_info = {
            "rounds_run": len(all_rounds),
            "rounds_kept": len(kept),
            "contended": contended,
            "probe_best_ms": round(best_probe * 1e3, 4),
            "probe_median_ms": round(statistics.median(p for p, _ in all_rounds) * 1e3, 4),
        }

    # ---- reporting -------------------------------------------------------------------------

    def _ratios(self, medians: dict[str, float]) -> dict[str, float]:
        if self.floor not in medians:
            return {}
        return {name: value / medians[self.floor] for name, value in medians.items()}

    def targets(self) -> list[dict]:
        """Each target (variant → max ratio to the floor), judged on the interleaved quiet
        medians when there are any, else on pytest-benchmark's."""
        pedantic, interleaved = self._ratios(self.medians), self._ratios(self.interleaved)
        rows = []
        for name, limit in self.suite.get("targets", {}).items():
            judged = interleaved.get(name, pedantic.get(name))
            rows.append(
                {
                    "ratio": f"{name}/{self.floor}",
                    "target_max": limit,
                    "measured_pytest_benchmark": pedantic.get(name),
                    "measured_interleaved": interleaved.get(name),
                    "met": judged is not None and judged <= limit,
                }
            )
        return rows

    def contended_pedantic(self) -> list[str]:
        """Variants whose pytest-benchmark run had a slow probe before or after it."""
        if not self.probes:
            return []
        best = min(
            [min(p) for p in self.probes.values()] + [self.interleaved_info.get("probe_best_ms", math.inf) / 1e3]
        )
        return [n for n, p in self.probes.items() if max(p) > QUIET_FACTOR * best + QUIET_SLACK_S]

    def table(self) -> str:
        pedantic, interleaved = self._ratios(self.medians), self._ratios(self.interleaved)
        names = list(dict.fromkeys(list(self.medians) + list(self.interleaved)))
        width = max([len(self.labels.get(n, n)) for n in names] + [10])

        def cell(values: dict, name: str, scale: float, fmt: str) -> str:
            return format(values[name] * scale, fmt) if name in values else "-"

        lowest = self._ratios(self.interleaved_min)
        lines = [
            f"\n== {self.suite['title']} ==  (torch {torch.__version__}, {torch.get_num_threads()} threads)",
            f"{'variant':<{width}}  {'median ms':>10}  {'x floor':>8}  {'interleaved ms':>14}  {'x floor':>8}"
            f"  {'inter. min ms':>13}  {'x floor':>8}",
        ]
        for name in names:
            lines.append(
                f"{self.labels.get(name, name):<{width}}  {cell(self.medians, name, 1e3, '.2f'):>10}"
                f"  {cell(pedantic, name, 1, '.3f'):>8}  {cell(self.interleaved, name, 1e3, '.2f'):>14}"
                f"  {cell(interleaved, name, 1, '.3f'):>8}  {cell(self.interleaved_min, name, 1e3, '.2f'):>13}"
                f"  {cell(lowest, name, 1, '.3f'):>8}"
            )
        info = self.interleaved_info
        if info:
            lines.append(
                f"interleaved: {info['rounds_kept']} quiet rounds kept of {info['rounds_run']} "
                f"(probe best {info['probe_best_ms']} ms, median {info['probe_median_ms']} ms)"
                + ("  ** CONTENDED: every round kept; ratios unreliable **" if info["contended"] else "")
            )
        slow = self.contended_pedantic()
        if slow:
            lines.append(f"pytest-benchmark figures taken under contention (probe slow around): {', '.join(slow)}")
        for row in self.targets():
            got = ", ".join(
                f"{label} {v:.3f}x"
                for label, v in (
                    ("interleaved", row["measured_interleaved"]),
                    ("pytest-benchmark", row["measured_pytest_benchmark"]),
                )
                if v is not None
            )
            lines.append(
                f"target {row['ratio']} <= {row['target_max']}x: {got or '-'} -> {'MET' if row['met'] else 'NOT MET'}"
            )
        for key, value in self.suite.get("anchors", {}).items():
            lines.append(f"anchor: {key}: {value}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        def ms(values):
            return {k: round(v * 1e3, 4) for k, v in values.items()}

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
            "ratios": {k: round(v, 4) for k, v in self._ratios(self.medians).items()},
            "probe_ms_before_after": {k: [round(v * 1e3, 4) for v in p] for k, p in self.probes.items()},
            "pytest_benchmark_contended": self.contended_pedantic(),
            "interleaved_median_ms": ms(self.interleaved),
            "interleaved_ratios": {k: round(v, 4) for k, v in self._ratios(self.interleaved).items()},
            "interleaved_min_ms": ms(self.interleaved_min),
            "interleaved_min_ratios": {k: round(v, 4) for k, v in self._ratios(self.interleaved_min).items()},
            "interleaved": self.interleaved_info,
            "targets": self.targets(),
            "anchors": self.suite.get("anchors", {}),
            "loadavg_start": self.load_start,
            "loadavg_end": _loadavg(),
            **machine_info(),
            **self.extra,
        }

    def finish(self) -> None:
        if not self.medians and not self.interleaved and not self.extra:
            return  # nothing measured (deselected, or --benchmark-disable)
        print(self.table())
        for key, value in self.extra.items():
            print(f"{key}: {json.dumps(value)}")
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"cpu_{self.suite['name']}.json"
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


# ---- checking ----------------------------------------------------------------------------------


def assert_close(name: str, got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-4) -> None:
    """max |got − expected| ≤ tol · max |expected| (sparse tensors compared densely), with a
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


# ---- fixtures ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(request):
    """The module's :class:`BenchReport` (from its ``SUITE``); prints and saves at module end."""
    bench_report = BenchReport(request.module.SUITE)
    yield bench_report
    bench_report.finish()


@pytest.fixture(scope="session")
def bench():
    """The helpers above for the bench modules (a rootless conftest cannot be imported by name
    when tests/ is collected in the same run)."""
    return SimpleNamespace(Variant=Variant, assert_close=assert_close, skip_if_not_timing=skip_if_not_timing)
