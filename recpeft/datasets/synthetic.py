"""The embedded default data: a small synthetic shop with several markets, made by code.

Ground truth: user u, item i, market m have latent vectors p_u, q_i, c_m (dimension k) and the
click probability is σ(p_u·q_i + c_m·q_i + b_i − τ), with b_i a Zipf-like popularity. Every
market shares the users' and items' vectors but has its own taste c_m, so a model pretrained on
all markets (mostly the big first one) must adapt per market: the personalisation problem.
Users live in one market each; impressions are sampled per market in proportion to its size.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_MARKETS = ("UK", "DE", "FR", "ES")


def make_shop(
    markets: tuple[str, ...] = DEFAULT_MARKETS,
    market_share: tuple[float, ...] = (0.85, 0.05, 0.05, 0.05),
    num_users: int = 2000,
    num_items: int = 200,
    impressions: int = 100_000,
    latent_dim: int = 8,
    taste_strength: float = 3.0,
    seed: int = 0,
) -> pd.DataFrame:
    """Impressions as a DataFrame with columns user, item, market (category), day, label.

    ``day`` runs 0..99 uniformly, for time splits.
    """
    if len(markets) != len(market_share):
        raise ValueError(f"{len(markets)} markets but {len(market_share)} shares")
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(num_users, latent_dim)) / np.sqrt(latent_dim)
    items = rng.normal(size=(num_items, latent_dim))
    tastes = rng.normal(size=(len(markets), latent_dim)) * taste_strength / np.sqrt(latent_dim)
    popularity = -np.log1p(np.arange(num_items)) * 0.3
    rng.shuffle(popularity)
    share = np.asarray(market_share, dtype=float) / np.sum(market_share)
    user_market = rng.choice(len(markets), size=num_users, p=share)

    market = rng.choice(len(markets), size=impressions, p=share)
    user = np.empty(impressions, dtype=np.int64)
    for m in range(len(markets)):
        rows = market == m
        user[rows] = rng.choice(np.flatnonzero(user_market == m), size=rows.sum())
    item = rng.integers(0, num_items, size=impressions)
    logit = np.einsum("nk,nk->n", users[user] + tastes[market], items[item]) + popularity[item] - 0.5
    label = (rng.random(impressions) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
    return pd.DataFrame({
        "user": user,
        "item": item,
        "market": pd.Categorical.from_codes(market, categories=list(markets)),
        "day": rng.integers(0, 100, size=impressions),
        "label": label,
    })
