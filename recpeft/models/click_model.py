"""A compact click model over ids, the kind recpeft adapts per segment.

logit = MLP([e_u, e_i, e_m, e_u ⊙ e_i]) with e_u = users[u], e_i = items[i], e_m = markets[m]
(D-dimensional tables) and an MLP of two hidden layers.
"""

from __future__ import annotations

import torch
from torch import nn


class ClickModel(nn.Module):
    """Args: num_users, num_items, num_markets, dim (D), hidden (MLP width).

    Input: user [B], item [B], market [B] int64 ids. Output: click logits [B].

    Example::

        model = ClickModel(num_users=100, num_items=50, num_markets=3)
        logits = model(torch.tensor([1, 2]), torch.tensor([3, 4]), torch.tensor([0, 2]))
    """

    def __init__(self, num_users: int, num_items: int, num_markets: int, dim: int = 16, hidden: int = 64):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        self.items = nn.Embedding(num_items, dim)
        self.markets = nn.Embedding(num_markets, dim)
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        for table in (self.users, self.items, self.markets):
            nn.init.normal_(table.weight, std=0.1)

    def forward(self, user: torch.Tensor, item: torch.Tensor, market: torch.Tensor) -> torch.Tensor:
        e_u, e_i = self.users(user), self.items(item)
        features = torch.cat([e_u, e_i, self.markets(market), e_u * e_i], dim=1)
        return self.mlp(features).squeeze(1)
