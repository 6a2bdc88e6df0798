"""The GPU suite: on a CUDA GPU, check every Triton kernel against the reference op, then time
each op side by side with ``triton.testing.do_bench`` (median) and write every figure as JSON to
``benchmarks/results/gpu_<device>_<date>.json``. Finishes in under five minutes on an H200.

    python benchmarks/gpu_suite.py [--sections linear,embedding_bag] [--quick]

It runs from a plain checkout: when recpeft is not installed, the top-level ``kernels/`` folder is
registered as ``recpeft.kernels`` (what setup.py's package mapping does for an install), so the
GPU machine needs only torch and triton.

Each section is a module in ``gpu_sections/`` with ``run(env, quick) -> dict`` that raises when a
kernel disagrees with the reference (nothing is timed then) and returns its rows; ``env`` holds the
device's measured copy bandwidth and bf16 matrix rate, the floors every op is compared against.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))


def make_recpeft_importable() -> None:
    """Import recpeft.kernels from the checkout when no install provides it: a bare ``recpeft``
    package (its ``__init__`` is not run: the suite needs the kernels only) with the top-level
    ``kernels/`` folder as ``recpeft.kernels``."""
    try:
        import recpeft.kernels  # noqa: F401  (an install, editable or not)

        return
    except ImportError:  # a source tree without the package mapping
        for name in [n for n in sys.modules if n == "recpeft" or n.startswith("recpeft.")]:
            del sys.modules[name]
    package = types.ModuleType("recpeft")
    package.__path__ = [str(ROOT / "recpeft")]
    sys.modules["recpeft"] = package
    spec = importlib.util.spec_from_file_location(
        "recpeft.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
    )
    kernels = importlib.util.module_from_spec(spec)
    sys.modules["recpeft.kernels"] = package.kernels = kernels
    spec.loader.exec_module(kernels)


SECTIONS = ["linear", "embedding_bag", "segmented", "minilm"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--quick", action="store_true", help="smaller shapes (a smoke run, not for the record)")
    parser.add_argument("--out", default=str(HERE / "results"), help="folder for the JSON")
    args = parser.parse_args(argv)

    import torch
    import triton

    make_recpeft_importable()
    if not torch.cuda.is_available():
        print("gpu_suite: no CUDA device; nothing to measure", file=sys.stderr)
        return 2
    from gpu_sections.common import measure_device

    started = time.perf_counter()
    env = measure_device()
    print(
        f"{env['device']}: copy {env['copy_gbps']:.0f} GB/s, bf16 matmul {env['bf16_tflops']:.0f} TFLOP/s "
        f"(torch {torch.__version__}, triton {triton.__version__})"
    )
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
