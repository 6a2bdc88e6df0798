"""The one place that picks an implementation for every adapter op.

CUDA tensors go to Triton (when triton is installed), everything else to
:mod:`recpeft.kernels.reference`. ``RECPEFT_BACKEND=torch|triton`` in the environment, or the
``backend`` argument of each op, forces one.

Every op has a Triton version, listed in :data:`TRITON_MODULES`: a registered module that fails
to import (a renamed or broken kernel file), or that lacks the op, raises an ImportError naming it
— never a silent fall back to torch on CUDA. The per-sample routing ops (``segmented_*``) come in
two forms: the layers' (a list of :class:`~recpeft.kernels.reference.AdapterWeights`; on the CPU
the reference op loops over the adapters present) and the stacked one (A_stack, B_stack, scales;
loop-free on both backends).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Callable
from enum import Enum

import torch

from . import reference
from .failures import BACKEND_ENV, naming_kernel_failures

# Triton is a dependency on Linux only (pyproject.toml); elsewhere CUDA tensors use the reference
# ops unless Triton is forced. Looked up without importing triton.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


class Backend(str, Enum):
    TORCH = "torch"
    TRITON = "triton"


# op name → module of this package that holds its Triton implementation (a function of the
# same name that takes the reference op's arguments). Imported on first use, so machines without
# Triton never import it. tests/kernels/test_dispatch.py imports every entry.
TRITON_MODULES: dict[str, str] = {
    "lora_linear": "lora_linear",
    "lora_embedding_bag": "lora_embedding_bag",
    "segmented_lora_linear": "segmented_lora",
    "segmented_lora_linear_stacked": "segmented_lora",
    "segmented_lora_bag_delta": "segmented_lora",
    "segmented_lora_bag_stacked": "segmented_lora",
}


def triton_op(name: str) -> Callable | None:
    """The Triton implementation of op ``name``; None when the op has none (not in
    :data:`TRITON_MODULES`). Raises ImportError naming the module when a registered module does
    not import or does not define ``name``."""
    module_name = TRITON_MODULES.get(name)
    if module_name is None:
        return None
    qualified = f"{__package__}.{module_name}"
    try:
        module = importlib.import_module(qualified)
    except ImportError as exc:
        raise ImportError(
            f"{qualified}, the Triton module registered for op {name!r} in "
            f"dispatch.TRITON_MODULES, does not import: {exc}",
            name=qualified,
        ) from exc
    op = getattr(module, name, None)
    if not callable(op):
        raise ImportError(
            f"{qualified}, registered for op {name!r} in dispatch.TRITON_MODULES, defines no function {name!r}",
            name=qualified,
        )
    return op


def resolve_backend(tensor: torch.Tensor, backend: str | Backend | None = None) -> Backend:
    """The backend for an op on ``tensor``: the argument, else $RECPEFT_BACKEND, else by device."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV) or None
    if choice is None:
        return Backend.TRITON if tensor.is_cuda and TRITON_INSTALLED else Backend.TORCH
    try:
        return Backend(choice)
    except ValueError:
        options = ", ".join(b.value for b in Backend)
        raise ValueError(
            f"unknown backend {choice!r} (from {BACKEND_ENV} or argument); use one of: {options}"
        ) from None


def uses_triton(name: str, tensor: torch.Tensor, backend: str | Backend | None = None) -> bool:
    """Whether op ``name`` on ``tensor`` will run its Triton implementation (a layer asks this to
    skip work that the fused op does itself)."""
    return resolve_backend(tensor, backend) is Backend.TRITON and triton_op(name) is not None


def _implementation(name: str, tensor: torch.Tensor, backend) -> Callable:
    """The Triton op when Triton is chosen, else the reference op (ops in TRITON_MODULES)."""
    if resolve_backend(tensor, backend) is Backend.TRITON:
        return _naming_failures(name, triton_op(name))
    return getattr(reference, name)


def _naming_failures(name: str, op: Callable) -> Callable:
    """``op``, whose compile or launch failures become one RuntimeError naming the op, the operand
    shapes and the way around it (:func:`~recpeft.kernels.failures.naming_kernel_failures`; the
    autograd Functions name their backward's the same way)."""

    def run(*args):
        with naming_kernel_failures(name, args):
            return op(*args)

    return run


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, *, backend=None):
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ; see :mod:`recpeft.kernels.reference`."""
    return _implementation("lora_linear", x, backend)(x, weight, bias, lora_A, lora_B, scale, dropout_p)


def lora_embedding_bag(table, layout, lora_A, lora_B, scale, base_output=None, *, backend=None):
    """pooled_j = Σ w_i·E[i] + s·(Σ w_i·A[i])·B over a :class:`~recpeft.kernels.bags.BagLayout`."""
    return _implementation("lora_embedding_bag", table, backend)(table, layout, lora_A, lora_B, scale, base_output)


def segmented_lora_linear(x, weight, bias, adapters, row_adapter, *, backend=None):
    """y_i = x_i·Wᵀ + b + s_a·(d(x_i)·A_aᵀ)·B_aᵀ, a = row_adapter[i] (−1: none), one
    :class:`~recpeft.kernels.reference.AdapterWeights` (or None) per routed adapter."""
    return _implementation("segmented_lora_linear", x, backend)(x, weight, bias, adapters, row_adapter)


def segmented_lora_linear_stacked(
    x, weight, bias, lora_A, lora_B, scales, row_adapter, dropout_p=None, *, backend=None
):
    """The same with the adapters stacked: lora_A [n, R, K], lora_B [n, N, R], scales [n]
    (:func:`reference.segmented_lora_linear_stacked`)."""
    op = _implementation("segmented_lora_linear_stacked", x, backend)
    return op(x, weight, bias, lora_A, lora_B, scales, row_adapter, dropout_p)


def segmented_lora_bag_delta(layout, adapters, bag_adapter, out_dim, dtype, *, backend=None):
    """delta_j = s_a·(Σ w_i·A_a[i])·B_a, a = bag_adapter[j] (zero for −1), for pooled and plain
    lookups, one AdapterWeights (or None) per routed adapter."""
    op = _implementation("segmented_lora_bag_delta", bag_adapter, backend)
    return op(layout, adapters, bag_adapter, out_dim, dtype)


def segmented_lora_bag_stacked(layout, lora_A, lora_B, scales, bag_adapter, base_output=None, *, backend=None):
    """base_j + s_a·(Σ w_i·A_a[i])·B_a with the adapters stacked: lora_A [n, V, R], lora_B
    [n, R, D], scales [n] (:func:`reference.segmented_lora_bag_stacked`)."""
    op = _implementation("segmented_lora_bag_stacked", lora_A, backend)
    return op(layout, lora_A, lora_B, scales, bag_adapter, base_output)
