"""A tiny recommender for model-level tests: every layer type recpeft wraps, samples first."""

from __future__ import annotations

import torch
from torch import nn

NUM_ITEMS, DIM, DENSE = 60, 8, 4


class TinyRecommender(nn.Module):
    """history [B, L] ids (mean-pooled bag, padding id 0), item [B] ids, dense [B, 4] → logit [B]."""

    def __init__(self):
        super().__init__()
        self.history = nn.EmbeddingBag(NUM_ITEMS, DIM, mode="mean", padding_idx=0)
        self.item = nn.Embedding(NUM_ITEMS, DIM)
        self.dense = nn.Linear(DENSE, DIM)
        self.mlp = nn.Sequential(nn.Linear(3 * DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, history, item, dense):
        features = torch.cat([self.history(history), self.item(item), self.dense(dense)], dim=1)
        return self.mlp(features).squeeze(1)


def make_model(seed: int = 0) -> TinyRecommender:
    torch.manual_seed(seed)
    return TinyRecommender()


def make_batch(batch: int = 16, seed: int = 1, length: int = 5):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, NUM_ITEMS, (batch, length), generator=g),
        torch.randint(1, NUM_ITEMS, (batch,), generator=g),
        torch.randn(batch, DENSE, generator=g),
    )


ALL_TARGETS = ["history", "item", "dense", "mlp.0", "mlp.2"]


def train_steps(model, steps: int = 3, seed: int = 1, lr: float = 0.05, adapter_ids=None):
    """A few LoraAdamW steps on a random click target; returns the losses."""
    from recpeft import LoraAdamW

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LoraAdamW(params, lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        batch = make_batch(seed=seed + step)
        target = (batch[2][:, 0] > 0).float()
        kwargs = {} if adapter_ids is None else {"adapter_ids": adapter_ids}
        loss = nn.functional.binary_cross_entropy_with_logits(model(*batch, **kwargs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
