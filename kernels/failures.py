"""Kernel failures, named: a Triton compile or launch error becomes one RuntimeError that says
which op (forward or backward), on which operands, and how to run without the kernels
(``RECPEFT_BACKEND=torch``) — never a silent fall back to the PyTorch ops.

Imports no triton (:mod:`recpeft.kernels.dispatch` uses it on machines without Triton too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch

BACKEND_ENV = "RECPEFT_BACKEND"


def describe(value) -> str:
    """A tensor as ``[4096, 256] float32 cuda:0``; a bag layout by its ids; anything else by type."""
    if isinstance(value, torch.Tensor):
        return f"[{', '.join(map(str, value.shape))}] {str(value.dtype).removeprefix('torch.')} {value.device}"
    ids = getattr(value, "ids", None)
    return f"bags of ids {describe(ids)}" if isinstance(ids, torch.Tensor) else type(value).__name__


def is_kernel_failure(exc: BaseException) -> bool:
    """A Triton compile or launch error (triton's own exception types, or a CUDA launch error)."""
    if type(exc).__module__.split(".")[0] == "triton":
        return True
    return isinstance(exc, RuntimeError) and ("CUDA error" in str(exc) or "triton" in str(exc).lower())


@contextlib.contextmanager
def naming_kernel_failures(op: str, operands: Iterable) -> Iterator[None]:
    """Within the block, a kernel failure (:func:`is_kernel_failure`) is re-raised as one
    RuntimeError naming ``op`` (e.g. ``lora_linear backward``) and the tensors among ``operands``;
    any other exception passes unchanged."""
    try:
        yield
    except Exception as exc:
        if not is_kernel_failure(exc):
            raise
        shapes = ", ".join(describe(a) for a in operands if a is not None and not isinstance(a, (int, float)))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuntimeError(
            f"recpeft.kernels {op}: the Triton kernel failed to compile or launch for {shapes}: "
            f"{type(exc).__name__}: {first}; set {BACKEND_ENV}=torch to run the PyTorch ops instead"
        ) from exc
