"""A small training loop for click models: LoraAdamW on the trainable parameters, binary
cross-entropy on logits, shuffled mini-batches, tqdm progress. (The full Trainer — schedules,
early stopping, checkpoints — builds on this.)"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .optim import LoraAdamW


@dataclass
class FitReport:
    epochs: int
    steps: int
    samples: int
    seconds: float
    final_loss: float

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def fit(model: nn.Module, features: tuple[torch.Tensor, ...], labels: torch.Tensor, *, epochs: int = 1,
        batch_size: int = 512, lr: float = 1e-2, weight_decay: float = 0.0, seed: int = 0,
        desc: str = "train", progress: bool = True) -> FitReport:
    """Train ``model(*features_batch) -> logits`` on ``labels`` (0/1) for ``epochs``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if any(not torch.isfinite(f).all() for f in features if f.is_floating_point()):
        raise ValueError("features hold non-finite values")
    optimizer = LoraAdamW(params, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    rows = labels.numel()
    steps, loss_value, start = 0, float("nan"), time.perf_counter()
    model.train()
    with tqdm(total=epochs * rows, desc=desc, unit="samples", disable=not progress, leave=False) as bar:
        for _ in range(epochs):
            order = torch.randperm(rows, generator=generator)
            for begin in range(0, rows, batch_size):
                index = order[begin:begin + batch_size]
                logits = model(*(f[index] for f in features))
                loss = nn.functional.binary_cross_entropy_with_logits(logits, labels[index])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                steps, loss_value = steps + 1, loss.item()
                bar.update(index.numel())
    model.eval()
    return FitReport(epochs, steps, epochs * rows, time.perf_counter() - start, loss_value)


@torch.no_grad()
def predict(model: nn.Module, features: tuple[torch.Tensor, ...], batch_size: int = 8192, **kwargs) -> torch.Tensor:
    """Logits for every row, in batches, in eval mode."""
    model.eval()
    rows = features[0].shape[0]
    return torch.cat([model(*(f[i:i + batch_size] for f in features), **kwargs) for i in range(0, rows, batch_size)]) \
        if rows else torch.zeros(0)
