"""A two-tower retriever: a user tower and an item tower, scored by a dot product.

Each tower embeds its id and its categorical features (one table of dimension D each), concatenates
them and maps them through an MLP to a D-dimensional vector:

    u = MLP_u([U[user], F¹_u[f¹], …])        v = MLP_v([I[item], F¹_v[g¹], …])       [B, D]
    score(user, item) = u · v                                                       [B]

The score is a logit: train it with binary cross-entropy on clicks, or with the in-batch softmax
loss (each user's positive item against the other items of the batch), and retrieve with
``score_all`` (every user against every item).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _mlp(in_features: int, hidden: tuple[int, ...], out_features: int, dropout: float) -> nn.Sequential:
    """Linear → ReLU → Dropout per hidden size, then a final Linear to ``out_features``; the
    Linear layers sit at indices 0, 3, 6, … of the Sequential."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout)]
        in_features = width
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


class Tower(nn.Module):
    """One tower: tables ``tables[name]`` [V_name, D] for the id ("id") and each feature, an MLP.

    Input: ids [B] int64 and features {name: [B] int64} for every feature. Output: [B, D].
    """

    def __init__(
        self, num_ids: int, features: dict[str, int], dim: int, hidden: tuple[int, ...], dropout: float, init_std: float
    ):
        super().__init__()
        if "id" in features:
            raise ValueError("a feature may not be called 'id' (the table of the tower's own ids)")
        sizes = {"id": num_ids, **features}
        self.tables = nn.ModuleDict({name: nn.Embedding(rows, dim) for name, rows in sizes.items()})
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
        self.mlp = _mlp(dim * len(self.tables), tuple(hidden), dim, dropout)

    def forward(self, ids: torch.Tensor, features: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        features = features or {}
        missing = [name for name in self.tables if name != "id" and name not in features]
        if missing:
            raise ValueError(f"features {missing} are missing (the tower was built with {list(self.tables)[1:]})")
        parts = [self.tables["id"](ids)] + [self.tables[name](features[name]) for name in list(self.tables)[1:]]
        return self.mlp(torch.cat(parts, dim=-1))


class TwoTower(nn.Module):
    """Args:
        num_users, num_items: id counts (tables ``user_tower.tables.id``, ``item_tower.tables.id``).
        user_features, item_features: categorical feature → cardinality, one D-dim table each.
        dim: D, the table and output dimension. hidden: MLP hidden sizes. dropout: after each
        hidden ReLU. init_std: tables start N(0, init_std²).

    Shapes: user, item [B] int64; features {name: [B]}; ``forward`` → scores [B];
    ``user_embeddings`` → [B, D]; ``item_embeddings`` → [N, D] (all items); ``score_all`` → [B, N].
    ``spec`` rebuilds it (``TwoTower(**model.spec)``). Per-sample adapter routing
    (``adapter_ids``) works for ``forward``; ``score_all`` and ``item_embeddings()`` run the item
    tower over all N items, whose rows are not the routed samples, so route ``forward`` or merge.

    Example::

        model = TwoTower(1000, 500, item_features={"category": 20}, dim=16)
        scores = model(torch.tensor([1, 2]), torch.tensor([3, 4]), item_feats={"category": torch.tensor([0, 5])})
        everything = model.score_all(torch.tensor([1, 2]), item_feats={"category": item_category})  # [2, 500]
    """

    def __init__(
        self,
        num_users: int,
        num_items: int,
        *,
        user_features: dict[str, int] | None = None,
        item_features: dict[str, int] | None = None,
        dim: int = 32,
        hidden: tuple[int, ...] = (64,),
        dropout: float = 0.0,
        init_std: float = 0.1,
    ):
        super().__init__()
        user_features, item_features = dict(user_features or {}), dict(item_features or {})
        self.spec = {
            "num_users": num_users,
            "num_items": num_items,
            "user_features": user_features,
            "item_features": item_features,
            "dim": dim,
            "hidden": list(hidden),
            "dropout": dropout,
            "init_std": init_std,
        }
        self.user_tower = Tower(num_users, user_features, dim, hidden, dropout, init_std)
        self.item_tower = Tower(num_items, item_features, dim, hidden, dropout, init_std)

    def user_embeddings(self, user: torch.Tensor, user_feats: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """u [B, D]."""
        return self.user_tower(user, user_feats)

    def item_embeddings(
        self, item: torch.Tensor | None = None, item_feats: dict[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """v for ``item`` [B] or, when ``item`` is None, for every item 0..N-1 ([N, D]; then
        ``item_feats`` gives each feature for every item, [N] each)."""
        if item is None:
            item = torch.arange(self.spec["num_items"], device=self.item_tower.tables["id"].weight.device)
        return self.item_tower(item, item_feats)

    def forward(
        self,
        user: torch.Tensor,
        item: torch.Tensor,
        user_feats: dict[str, torch.Tensor] | None = None,
        item_feats: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """score_b = u_b · v_b, [B]."""
        return (self.user_embeddings(user, user_feats) * self.item_embeddings(item, item_feats)).sum(-1)

    def score_all(
        self,
        user: torch.Tensor,
        user_feats: dict[str, torch.Tensor] | None = None,
        item_feats: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Every user against every item: U·Vᵀ, [B, N] (``item_feats`` for all N items)."""
        return self.user_embeddings(user, user_feats) @ self.item_embeddings(None, item_feats).t()

    @staticmethod
    def in_batch_softmax_loss(
        user_vec: torch.Tensor, item_vec: torch.Tensor, temperature: float = 1.0, item_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sampled softmax with the batch's items as negatives:
        L = −mean_b log softmax_j(u_b·v_j / τ)[b], u, v [B, D].

        With ``item_ids`` [B], another row holding the same item as row b is not counted as a
        negative of b (its logit is masked); without it, duplicates act as false negatives. No
        popularity (logQ) correction is applied.
        """
        if user_vec.shape != item_vec.shape or user_vec.dim() != 2:
            raise ValueError(
                f"user_vec and item_vec must both be [B, D], got {tuple(user_vec.shape)} and {tuple(item_vec.shape)}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        logits = user_vec @ item_vec.t() / temperature
        if item_ids is not None:
            duplicate = (item_ids.unsqueeze(0) == item_ids.unsqueeze(1)) & ~torch.eye(
                len(item_ids), dtype=torch.bool, device=logits.device
            )
            logits = logits.masked_fill(duplicate, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))

    def lora_targets(self) -> list[str]:
        """Both towers' tables and linears, by full module name (the same before and after
        get_peft_model wraps them)."""
        linears = [f"mlp.{3 * i}" for i in range(len(self.spec["hidden"]) + 1)]  # see _mlp
        return [
            f"{side}_tower.{name}"
            for side in ("user", "item")
            for name in [f"tables.{t}" for t in ["id", *self.spec[f"{side}_features"]]] + linears
        ]
