"""The one place that picks an implementation for every adapter op.

CUDA tensors go to Triton (where a Triton version of the op is registered), everything else to
:mod:`recpeft.kernels.reference`. ``RECPEFT_BACKEND=torch|triton`` in the environment, or the
``backend`` argument of each op, forces one; forcing Triton for an op that has no Triton version
is an error, while the automatic choice falls back to the reference op.

Triton implementations are found through :data:`TRITON_MODULES`.
"""

from __future__ import annotations

import importlib
import os
from enum import Enum
from typing import Callable

import torch

from . import reference

BACKEND_ENV = "RECPEFT_BACKEND"


class Backend(str, Enum):
    TORCH = "torch"
    TRITON = "triton"


# op name → module of this package that holds its Triton implementation (a function of the
# same name and signature as the reference op). Imported on first use, so machines without
# Triton never import it.
TRITON_MODULES: dict[str, str] = {
    "lora_linear": "lora_linear",
    "lora_embedding_bag": "lora_embedding_bag",
    "segmented_lora_linear": "segmented_lora",
    "segmented_lora_bag_delta": "segmented_lora",
}


def triton_op(name: str) -> Callable | None:
    """The Triton implementation of op ``name``, or None when Triton or the kernel file is absent."""
    module_name = TRITON_MODULES.get(name)
    if module_name is None:
        return None
    qualified = f"{__package__}.{module_name}"
    try:
        module = importlib.import_module(qualified)
    except ModuleNotFoundError as exc:
        if exc.name in (qualified, "triton"):
            return None
        raise
    return getattr(module, name, None)


def resolve_backend(tensor: torch.Tensor, backend: str | Backend | None = None) -> Backend:
    """The backend for an op on ``tensor``: the argument, else $RECPEFT_BACKEND, else by device."""
    choice = backend if backend is not None else os.environ.get(BACKEND_ENV) or None
    if choice is None:
        return Backend.TRITON if tensor.is_cuda else Backend.TORCH
    try:
        return Backend(choice)
    except ValueError:
        options = ", ".join(b.value for b in Backend)
        raise ValueError(f"unknown backend {choice!r} (from {BACKEND_ENV} or argument); use one of: {options}") from None


def uses_triton(name: str, tensor: torch.Tensor, backend: str | Backend | None = None) -> bool:
    """Whether op ``name`` on ``tensor`` will run its Triton implementation (a layer asks this to
    skip work that the fused op does itself)."""
    return resolve_backend(tensor, backend) is Backend.TRITON and triton_op(name) is not None


def _implementation(name: str, tensor: torch.Tensor, backend) -> Callable:
    chosen = resolve_backend(tensor, backend)
    if chosen is Backend.TRITON:
        op = triton_op(name)
        if op is not None:
            return op
        forced = backend is not None or os.environ.get(BACKEND_ENV)
        if forced:
            raise NotImplementedError(f"op {name!r} has no Triton implementation yet; use {BACKEND_ENV}=torch")
    return getattr(reference, name)


def lora_linear(x, weight, bias, lora_A, lora_B, scale, dropout_p=0.0, *, backend=None):
    """y = x·Wᵀ + b + s·(d(x)·Aᵀ)·Bᵀ; see :mod:`recpeft.kernels.reference`."""
    return _implementation("lora_linear", x, backend)(x, weight, bias, lora_A, lora_B, scale, dropout_p)


def lora_embedding_bag(table, layout, lora_A, lora_B, scale, base_output=None, *, backend=None):
    """pooled_j = Σ w_i·E[i] + s·(Σ w_i·A[i])·B over a :class:`~recpeft.kernels.bags.BagLayout`."""
    return _implementation("lora_embedding_bag", table, backend)(table, layout, lora_A, lora_B, scale, base_output)


def segmented_lora_linear(x, weight, bias, adapters, row_adapter, *, backend=None):
    """Per-row adapter routing for the linear op; see :func:`reference.segmented_lora_linear`."""
    return _implementation("segmented_lora_linear", x, backend)(x, weight, bias, adapters, row_adapter)


def segmented_lora_bag_delta(layout, adapters, bag_adapter, out_dim, dtype, *, backend=None):
    """Per-bag adapter routing for pooled and plain lookups; see the reference op."""
    return _implementation("segmented_lora_bag_delta", bag_adapter, backend)(layout, adapters, bag_adapter, out_dim, dtype)
