"""BasketRanker: scores every product of a catalog as the missing item of a shopping basket.

Two towers and a context-weighted cross term. For B events and I items (D = ``dim``,
H = ``hidden``, F cross signals, C context scalars):

    x_b   = [customers[c_b], markets[m_b], basket(bag_b), history(hist_b), context_b]   [B, 4D + C]
    u_b, w_b = split(context_mlp(x_b), [D, F])          u [B, D], w [B, F]
    z_i   = [items[i], words(title_i), item_dense_i]                                     [I, 2D + 2]
    v_i   = item_mlp(z_i)                                                                 [I, D]
    logit_bi = u_b · v_i + Σ_f w_bf · cross_bif                                          [B, I]

``basket`` and ``history`` are mean-pooled ``nn.EmbeddingBag``s over item ids (the other items
of the basket, the customer's earlier purchases), ``words`` a mean-pooled ``nn.EmbeddingBag``
over title-word ids; ``item_dense`` holds log price and log popularity; ``cross`` the
per-(event, item) signals (repeat count, recency, recent sales) of
:class:`recpeft.datasets.online_retail.RetailEvents`. The catalog tensors are non-persistent
buffers, so a checkpoint holds the learned weights only. Training: softmax cross-entropy of the
purchased item against all I items.
"""

from __future__ import annotations

import torch
from torch import nn


class BasketRanker(nn.Module):
    """Args:
        num_customers, num_markets, num_words: table sizes (customer 0 = unknown).
        item_word_ids, item_word_offsets: titles as a CSR over word ids (offsets [I + 1]).
        item_dense: [I, 2] float item features.
        num_context, num_cross: C and F above.
        dim: D.  hidden: H.  dropout: on both MLPs' hidden layer.

    Input: customer [B], market [B], basket_ids, basket_offsets [B + 1], history_ids,
    history_offsets [B + 1], context [B, C], cross [B, I, F]. Output: logits [B, I].

    Example::

        model = BasketRanker(10, 2, 5, torch.tensor([0, 1, 2]), torch.tensor([0, 2, 3]), torch.randn(2, 2),
                             num_context=2, num_cross=3)
        logits = model(torch.tensor([1]), torch.tensor([0]), torch.tensor([1]), torch.tensor([0, 1]),
                       torch.tensor([0]), torch.tensor([0, 1]), torch.zeros(1, 2), torch.zeros(1, 2, 3))
    """

    def __init__(
        self,
        num_customers: int,
        num_markets: int,
        num_words: int,
        item_word_ids: torch.Tensor,
        item_word_offsets: torch.Tensor,
        item_dense: torch.Tensor,
        *,
        num_context: int,
        num_cross: int,
        dim: int = 64,
        hidden: int = 128,
        dropout: float = 0.1,
    ):
        super().__init__()
        num_items = item_dense.shape[0]
        if item_word_offsets.shape[0] != num_items + 1:
            raise ValueError(f"item_word_offsets has {item_word_offsets.shape[0]} entries; expected {num_items + 1}")
        self.num_cross = num_cross
        self.customers = nn.Embedding(num_customers, dim)
        self.markets = nn.Embedding(num_markets, dim)
        self.basket = nn.EmbeddingBag(num_items, dim, mode="mean")
        self.history = nn.EmbeddingBag(num_items, dim, mode="mean")
        self.items = nn.Embedding(num_items, dim)
        self.words = nn.EmbeddingBag(num_words, dim, mode="mean")
        self.context_mlp = nn.Sequential(
            nn.Linear(4 * dim + num_context, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim + num_cross)
        )
        self.item_mlp = nn.Sequential(
            nn.Linear(2 * dim + item_dense.shape[1], hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, dim)
        )
        for table in (self.customers, self.markets, self.basket, self.history, self.items, self.words):
            nn.init.normal_(table.weight, std=0.05)
        with torch.no_grad():
            self.customers.weight[0].zero_()
        mean, std = item_dense.mean(0), item_dense.std(0).clamp_min(1e-6)
        self.register_buffer("all_items", torch.arange(num_items), persistent=False)
        self.register_buffer("item_word_ids", item_word_ids.long(), persistent=False)
        self.register_buffer("item_word_offsets", item_word_offsets.long()[:-1].contiguous(), persistent=False)
        self.register_buffer("item_dense", ((item_dense - mean) / std).float(), persistent=False)

    def item_vectors(self) -> torch.Tensor:
        """v [I, D] of every item."""
        titles = self.words(self.item_word_ids, self.item_word_offsets)
        return self.item_mlp(torch.cat([self.items(self.all_items), titles, self.item_dense], dim=1))

    def forward(
        self,
        customer: torch.Tensor,
        market: torch.Tensor,
        basket_ids: torch.Tensor,
        basket_offsets: torch.Tensor,
        history_ids: torch.Tensor,
        history_offsets: torch.Tensor,
        context: torch.Tensor,
        cross: torch.Tensor,
    ) -> torch.Tensor:
        x = torch.cat(
            [
                self.customers(customer),
                self.markets(market),
                self.basket(basket_ids, basket_offsets[:-1]),
                self.history(history_ids, history_offsets[:-1]),
                context,
            ],
            dim=1,
        )
        out = self.context_mlp(x)
        u, w = out[:, : -self.num_cross], out[:, -self.num_cross :]
        return u @ self.item_vectors().T + torch.einsum("bif,bf->bi", cross, w)
