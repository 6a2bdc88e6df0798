"""Which optimizer steps which parameter, and the gradient clip that spans them all.

Optimizers. Parameters that get sparse gradients (rows of a batch's ids only) go to
:class:`~recpeft.train.lora_adamw.LoraAdamW` (lazy Adam on the touched rows); all others to
``torch.optim.AdamW(foreach=True)``. The split is structural, decided before the first step, so a
checkpoint always matches it: the parameters every adapter holder names as sparse
(:meth:`recpeft.layers.AdapterHolder.sparse_parameters`: the ``lora_A`` tables of embedding
adapters, the unsharded adapter tables of torchrec collections) and the weight of every
``nn.Embedding`` / ``nn.EmbeddingBag`` built with ``sparse=True`` (which covers torchrec's unsharded
collections). Both use the same lr and decoupled weight decay λ.

Clipping. With g the concatenation of every gradient, dense and sparse (a sparse one coalesced,
so it stands for its dense gradient), every gradient is scaled by min(1, c / (‖g‖₂ + 1e-6)).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from recpeft.layers import AdapterHolder
from recpeft.utils.validation import check_positive_number

from .lora_adamw import LoraAdamW

NamedParameters = list[tuple[str, nn.Parameter]]


def sparse_gradient_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of ``model`` whose gradients are sparse: every adapter holder's
    ``sparse_parameters`` of each of its adapters (the ``lora_A`` tables of embedding adapters)
    and the weights of ``nn.Embedding``/``nn.EmbeddingBag`` with ``sparse=True``."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, AdapterHolder):
            found.update((id(p), p) for adapter in module.adapter_names() for p in module.sparse_parameters(adapter))
        elif isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            found[id(module.weight)] = module.weight
    return list(found.values())


def split_by_gradient_kind(
    model: nn.Module, named_parameters: NamedParameters | None = None
) -> tuple[NamedParameters, NamedParameters]:
    """(dense, sparse): ``named_parameters`` (default: the ``requires_grad`` parameters of
    ``model``, by name) split into those with dense gradients and those in
    :func:`sparse_gradient_parameters`, each in the given order."""
    if named_parameters is None:
        named_parameters = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    sparse_ids = {id(p) for p in sparse_gradient_parameters(model)}
    dense = [(n, p) for n, p in named_parameters if id(p) not in sparse_ids]
    sparse = [(n, p) for n, p in named_parameters if id(p) in sparse_ids]
    return dense, sparse


def build_optimizers(
    model: nn.Module, lr: float, weight_decay: float = 0.0, *, named_parameters: NamedParameters | None = None
) -> list[torch.optim.Optimizer]:
    """The optimizers :class:`~recpeft.train.Trainer` steps: ``torch.optim.AdamW(foreach=True)``
    over the dense-gradient parameters (if any), then :class:`~recpeft.train.lora_adamw.LoraAdamW` over the
    sparse-gradient ones (if any), both with ``lr`` and decoupled ``weight_decay``.

    Args:
        model: the model whose modules decide the split (see :func:`split_by_gradient_kind`).
        lr: learning rate (> 0); the Trainer overwrites it every step with its schedule.
        weight_decay: decoupled weight decay λ (≥ 0).
        named_parameters: the (name, parameter) pairs to optimize; default every parameter of
            ``model`` with ``requires_grad``.
    """
    check_positive_number("build_optimizers: lr", lr)
    check_positive_number("build_optimizers: weight_decay", weight_decay, allow_zero=True)
    dense, sparse = split_by_gradient_kind(model, named_parameters)
    if not dense and not sparse:
        raise ValueError("build_optimizers: the model has no trainable parameters (requires_grad=True)")
    optimizers: list[torch.optim.Optimizer] = []
    if dense:
        optimizers.append(torch.optim.AdamW([p for _, p in dense], lr=lr, weight_decay=weight_decay, foreach=True))
    if sparse:
        optimizers.append(LoraAdamW([p for _, p in sparse], lr=lr, weight_decay=weight_decay))
    return optimizers


def set_lr(optimizers: Iterable[torch.optim.Optimizer], lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizers`` to ``lr``."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = lr


@torch.no_grad()
def clip_grad_norm(parameters, max_norm: float) -> float:
    """Scale every gradient by min(1, max_norm / (‖g‖₂ + 1e-6)) where ‖g‖₂ is the L2 norm of all
    gradients together, dense and sparse (``torch.nn.utils.clip_grad_norm_`` refuses sparse ones).
    A sparse gradient is coalesced first (duplicate rows summed), so its norm is the norm of the
    dense gradient it stands for; ``p.grad`` is replaced by the coalesced, scaled tensor.
    Returns ‖g‖₂ before clipping (float, computed in float32 or wider)."""
    grads = []
    for p in parameters:
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            p.grad = p.grad.coalesce()
            grads.append(p.grad._values())
        else:
            grads.append(p.grad)
    if not grads:
        return 0.0
    squares = torch.stack([g.detach().float().pow(2).sum().to(grads[0].device) for g in grads])
    total = float(squares.sum().sqrt())
    coefficient = max_norm / (total + 1e-6)
    if coefficient < 1.0:
        for g in grads:
            g.mul_(coefficient)
    return total
