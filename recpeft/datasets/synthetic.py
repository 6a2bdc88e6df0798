"""The embedded default data: a synthetic multi-market shop, made by code from a seed.

Catalogue: I items, each in one of C categories, made by one of R brands (a brand sells in one or
two categories), with a price drawn log-normally around its category's price level; price buckets
are the deciles of price. Item popularity follows a power law (Zipf exponent ``zipf``): what the
shop shows is drawn from it, so a few items get most impressions.

Users live in one market each; markets have very different sizes (``market_share``). A user
visits in sessions (timestamps over ``days`` days, with a daily cycle); each session shows
``slate`` items at positions 0..slate−1 and the user clicks each independently with

    logit = b + β_pop·log pop_i + p_u·(I + Δ_m)·q_i + κ_m[c_i] + λ_m[r_i] − π_m·z_price_i − ρ·log(1+pos)

- p_u, q_i ∈ R^k: user and item tastes, shared by every market;
- Δ_m = U_m·V_mᵀ (rank 2, zero for the first market): how market m reads the same tastes
  differently — a three-way user × market × item effect that a model pretrained on the pooled
  data cannot express with a market feature alone;
- κ_m[c]: market m's liking for category c; λ_m[r]: local brands, a few brands that market m
  favours strongly; π_m: the market's price sensitivity (z_price is the log price standardised
  within the category); ρ: position bias; b sets the overall click rate.
The first market is the big one; its κ, λ, Δ are the global taste the others depart from.

Returns one row per impression, in time order.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .schema import Schema

DEFAULT_MARKETS = ("UK", "DE", "FR", "ES", "NL")
DEFAULT_SHARE = (0.72, 0.08, 0.08, 0.06, 0.06)


@dataclass(frozen=True)
class ShopSpec:
    """Everything that decides the data; the same spec and seed give the same rows bit for bit."""

    markets: tuple[str, ...] = DEFAULT_MARKETS
    market_share: tuple[float, ...] = DEFAULT_SHARE
    num_users: int = 2500
    num_items: int = 3000
    num_categories: int = 24
    num_brands: int = 150
    sessions: int = 26_000
    slate: int = 10
    days: int = 91
    latent_dim: int = 8
    zipf: float = 0.9
    market_twist: float = 1.4
    category_taste: float = 0.7
    local_brands: int = 12
    local_brand_lift: float = 1.2
    price_sensitivity: tuple[float, ...] = (0.3, 0.9, -0.2, 0.6, 0.1)
    position_bias: float = 0.5
    base_logit: float = -3.0
    seed: int = 0

    def __post_init__(self):
        if len(self.markets) != len(self.market_share) or len(self.markets) != len(self.price_sensitivity):
            raise ValueError(
                f"{len(self.markets)} markets need as many market_share and price_sensitivity "
                f"values, got {len(self.market_share)} and {len(self.price_sensitivity)}"
            )
        if min(self.num_users, self.num_items, self.num_categories, self.num_brands, self.sessions, self.slate) < 1:
            raise ValueError("every count in ShopSpec must be ≥ 1")


def make_shop(spec: ShopSpec = ShopSpec(), *, with_truth: bool = False) -> pd.DataFrame:
    """Impressions with columns session, timestamp, market, user, item, category, brand, price,
    price_bucket, position, label (0/1), sorted by time; ``with_truth`` adds ``true_logit`` (the
    logit above, for the best AUC any model can reach)."""
    rng = np.random.default_rng(spec.seed)
    num_markets, k = len(spec.markets), spec.latent_dim

    # catalogue
    category = rng.integers(0, spec.num_categories, spec.num_items)
    brand_home = rng.integers(0, spec.num_categories, (spec.num_brands, 2))
    brand = np.empty(spec.num_items, dtype=np.int64)
    for c in range(spec.num_categories):
        makers = np.flatnonzero((brand_home == c).any(axis=1))
        rows = np.flatnonzero(category == c)
        brand[rows] = rng.choice(makers, rows.size) if makers.size else rng.integers(0, spec.num_brands, rows.size)
    category_price = rng.normal(2.5, 0.8, spec.num_categories)
    log_price = category_price[category] + rng.normal(0, 0.5, spec.num_items)
    price = np.round(np.exp(log_price), 2).clip(0.5)
    z_price = (log_price - category_price[category]) / 0.5
    price_bucket = np.searchsorted(np.quantile(price, np.linspace(0.1, 0.9, 9)), price, side="right")
    popularity = 1.0 / np.arange(1, spec.num_items + 1) ** spec.zipf
    popularity = popularity[rng.permutation(spec.num_items)]
    popularity /= popularity.sum()

    # tastes
    users = rng.normal(size=(spec.num_users, k)) / k**0.25
    items = rng.normal(size=(spec.num_items, k)) / k**0.25
    twists = rng.normal(size=(num_markets, k, 2)) @ rng.normal(size=(num_markets, 2, k)) * spec.market_twist / k
    twists[0] = 0.0
    category_taste = rng.normal(0, spec.category_taste, (num_markets, spec.num_categories))
    brand_taste = np.zeros((num_markets, spec.num_brands))
    for m in range(num_markets):
        brand_taste[m, rng.choice(spec.num_brands, spec.local_brands, replace=False)] = spec.local_brand_lift
    sensitivity = np.asarray(spec.price_sensitivity)

    # who visits when: markets by share, users by a power-law activity within their market
    share = np.asarray(spec.market_share, dtype=float) / np.sum(spec.market_share)
    user_market = rng.choice(num_markets, spec.num_users, p=share)
    activity = rng.pareto(1.5, spec.num_users) + 1.0
    session_market = rng.choice(num_markets, spec.sessions, p=share)
    session_user = np.empty(spec.sessions, dtype=np.int64)
    for m in range(num_markets):
        members = np.flatnonzero(user_market == m)
        rows = session_market == m
        session_user[rows] = rng.choice(members, rows.sum(), p=activity[members] / activity[members].sum())
    day = rng.integers(0, spec.days, spec.sessions)
    hour = np.clip(rng.normal(19, 4, spec.sessions), 0, 23.99)
    start = np.datetime64("2026-01-01") + (day * 86_400 + hour * 3600).astype("timedelta64[s]")

    # impressions: a slate of popular items per session
    rows = spec.sessions * spec.slate
    session = np.repeat(np.arange(spec.sessions), spec.slate)
    user, market = session_user[session], session_market[session]
    item = rng.choice(spec.num_items, rows, p=popularity)
    position = np.tile(np.arange(spec.slate), spec.sessions)
    taste = np.einsum("nk,nk->n", users[user], items[item]) + np.einsum(
        "nk,nkj,nj->n", users[user], twists[market], items[item]
    )
    logit = (
        spec.base_logit
        + 0.3 * np.log(popularity[item] * spec.num_items)
        + taste
        + category_taste[market, category[item]]
        + brand_taste[market, brand[item]]
        - sensitivity[market] * z_price[item]
        - spec.position_bias * np.log1p(position)
    )
    label = (rng.random(rows) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int8)
    timestamp = start[session] + (position * 7).astype("timedelta64[s]")

    frame = pd.DataFrame(
        {
            "session": session.astype(np.int32),
            "timestamp": timestamp.astype("datetime64[ns]"),
            "market": pd.Categorical.from_codes(market, categories=list(spec.markets)),
            "user": user.astype(np.int32),
            "item": item.astype(np.int32),
            "category": pd.Categorical.from_codes(category[item], [f"cat{c:02d}" for c in range(spec.num_categories)]),
            "brand": pd.Categorical.from_codes(brand[item], [f"brand{r:03d}" for r in range(spec.num_brands)]),
            "price": price[item],
            "price_bucket": price_bucket[item].astype(np.int8),
            "position": position.astype(np.int8),
            "label": label,
        }
    )
    if with_truth:
        frame["true_logit"] = logit
    return frame.sort_values(["timestamp", "position"], kind="stable").reset_index(drop=True)


#: the embedded copy: data/shop.parquet in a source checkout (made by data/make_shop.py)
#: the columns of the embedded shop and their roles
SHOP_SCHEMA = Schema(
    user="user",
    item="item",
    label="label",
    segment="market",
    timestamp="timestamp",
    categorical=("category", "brand", "price_bucket"),
    dense=("price", "position"),
)
EMBEDDED_PATH = Path(__file__).resolve().parents[2] / "data" / "shop.parquet"


def load_shop(path: str | Path | None = None) -> pd.DataFrame:
    """The embedded default shop: the committed ``data/shop.parquet`` of a source checkout, or,
    where that file is absent (an installed wheel), the same rows made again from the default
    spec (``make_shop()``; the generator is deterministic, a test checks the two are equal)."""
    source = Path(path) if path is not None else EMBEDDED_PATH
    if source.is_file():
        return pd.read_parquet(source)
    if path is not None:
        raise FileNotFoundError(f"no shop data at {source}")
    return make_shop()
