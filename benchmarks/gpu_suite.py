"""The GPU suite: on a CUDA GPU, check every Triton kernel against the reference op, then time
each op side by side with ``triton.testing.do_bench`` (median) and write every figure as JSON to
``benchmarks/results/gpu_<device>_<date>.json``. Finishes in under five minutes on an H200.

    pip install --no-deps --no-build-isolation -e .    # makes recpeft.kernels importable
    python benchmarks/gpu_suite.py [--sections linear,embedding_bag] [--quick]

Each section is a module in ``gpu_sections/`` with ``run(env, quick) -> dict`` that raises when a
kernel disagrees with the reference (nothing is timed then) and returns its rows; ``env`` holds the
device's measured copy bandwidth and bf16 matrix rate, the floors every op is compared against.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

SECTIONS = ["linear", "embedding_bag"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run, not for the record)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    from gpu_sections.common import measure_device

    started = time.perf_counter()
    env = measure_device()
    print(f"{env['device']}: copy {env['copy_gbps']:.0f} GB/s, bf16 matmul {env['bf16_tflops']:.0f} TFLOP/s "
          f"(torch {torch.__version__}, triton {triton.__version__})")
    report = {"env": env, "quick": args.quick, "sections": {}, "errors": {}}
    for name in args.sections.split(","):
        try:
            module = importlib.import_module(f"gpu_sections.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"gpu_sections.{name}":
                raise
            report["errors"][name] = "section not written yet"
            continue
        try:
            report["sections"][name] = module.run(env, args.quick)
        except Exception as exc:  # one broken section must not lose the others' figures
            report["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"section {name} FAILED: {report['errors'][name]}", file=sys.stderr)
    report["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    device = env["device"].replace(" ", "_").replace("/", "_")
    path = out / f"gpu_{device}_{stamp}{'_quick' if args.quick else ''}.json"
    fd, tmp = tempfile.mkstemp(dir=out, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(report, handle, indent=2)
    os.replace(tmp, path)
    print(f"wrote {path} in {report['seconds']:.0f} s")
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
