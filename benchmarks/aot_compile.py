"""Compile every Triton kernel variant for sm_90 (H100/H200) on this machine, GPU or not, and
write the table — kernel, config, dtype, flags, registers, spills, shared memory — to
``benchmarks/results/aot_sm90.json``. Exits non-zero on a compile error or on a variant the
launchers can pick that needs more shared memory than an sm_90 block may use.

    python benchmarks/aot_compile.py [--mode full|sample] [--out PATH] [--jobs N]

``make aot`` runs the full matrix. The work is :mod:`recpeft.kernels.aot` (the default test
suite runs its ``sample`` mode); this script only sets the defaults and clears TRITON_INTERPRET,
under which the kernels are not compilable.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "aot_sm90.json"

if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET"):
        os.execve(
            sys.executable,
            [sys.executable, *sys.argv],
            {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        )
    from recpeft.kernels.aot import main

    args = sys.argv[1:]
    defaults = [] if "--mode" in args else ["--mode", "full"]
    defaults += [] if "--out" in args else ["--out", str(DEFAULT_OUT)]
    sys.exit(main(defaults + args))
