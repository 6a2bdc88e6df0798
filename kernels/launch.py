"""What every Triton op file shares about launching: the interpreter flag, the smallest ``tl.dot``
dimension and the one rank-padding rule.

Each value is written here once, with the reason behind it; the op files
(:mod:`recpeft.kernels.lora_linear`, :mod:`recpeft.kernels.lora_embedding_bag`) import them and
keep only their own op's launch settings. Imported by the op files only, so machines without
Triton never import it.
"""

from __future__ import annotations

import os

import triton

# Triton runs kernels on the CPU, interpreted, when TRITON_INTERPRET=1 is set before triton is
# imported (tests/conftest.py does that on machines without CUDA). Read once, at import, as
# triton reads it. The interpreter accepts what the GPU compiler refuses and computes some things
# differently (DESIGN.md, "Triton without a GPU"); the op files adapt to it through this flag.
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

# The GPU compiler refuses tl.dot with a dimension under 16 (the interpreter accepts it, so only
# a GPU build shows the error): r and small blocks are padded to this.
DOT_MIN = 16

# Shared memory one block may use on an H100/H200 (sm_90: 227 KB of the SM's 228 KB). A variant
# over it compiles but fails to launch; the op files prune such configs before the autotuner
# sees them, and kernels/aot.py checks every variant against it.
SHARED_MEMORY_LIMIT = 232_448


def padded_rank(rank: int) -> int:
    """r padded for ``tl.dot`` and ``tl.arange``: the next power of two, at least :data:`DOT_MIN`;
    the padding lanes are masked off."""
    return max(DOT_MIN, triton.next_power_of_2(rank))
