"""A tiny convolutional tower for model-level conv LoRA tests: a Conv2d stem, a Conv1d over the
flattened feature map and a Linear head, samples first."""

from __future__ import annotations

import torch
from torch import nn

CHANNELS, SIDE = 3, 8
CONV_TARGETS = ["stem", "seq"]


class TinyCNN(nn.Module):
    """images [B, 3, 8, 8] → stem Conv2d(3→6, 3×3, stride 2, padding 1) → ReLU → [B, 6, 16] →
    seq Conv1d(6→5, 3, padding 1) → ReLU → mean over the 16 positions → head Linear(5→1) → [B]."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(CHANNELS, 6, 3, stride=2, padding=1)
        self.seq = nn.Conv1d(6, 5, 3, padding=1)
        self.head = nn.Linear(5, 1)

    def forward(self, images):
        features = torch.relu(self.stem(images)).flatten(2)
        return self.head(torch.relu(self.seq(features)).mean(2)).squeeze(1)


def make_cnn(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN().eval()


def make_images(batch: int = 6, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, CHANNELS, SIDE, SIDE, generator=torch.Generator().manual_seed(seed))


def perturb_trainable(model: nn.Module, seed: int, std: float = 0.3) -> None:
    """Move every trainable parameter off its start (as training would), reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=g, dtype=param.dtype) * std)
