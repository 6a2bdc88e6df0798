"""Product titles for the embedded shop's catalogue, made from what the shop knows of each item.

A title reads like a listing: ``"<Brand> <finish> <colour> <product>"``, e.g. ``"Nitae quality
slate-grey denim jacket"``. The product noun phrase comes from the item's category (one of
24), the brand name from its brand (one of 150, a made-up word per brand), the finish word from its
price decile (budget … luxury), the colour from the item id. Titles are a pure function of those
columns: the same catalogue gives the same titles bit for bit, in any process.
"""

from __future__ import annotations

import pandas as pd

#: the product noun phrase of each of the shop's 24 categories (cat00 … cat23)
PRODUCTS = (
    "trail running shoes", "linen shirt", "electric kettle", "wireless earbuds", "yoga mat",
    "ceramic mug", "denim jacket", "desk lamp", "backpack", "wool scarf", "cast iron pan",
    "phone case", "board game", "scented candle", "water bottle", "leather wallet",
    "garden gloves", "bluetooth speaker", "cotton towel set", "sunglasses", "notebook",
    "coffee grinder", "rain jacket", "pillow",
)  # fmt: skip
FINISH = ("budget", "basic", "everyday", "classic", "standard", "quality", "select", "premium", "deluxe", "luxury")
COLOURS = ("black", "white", "navy", "slate-grey", "olive", "sand", "burgundy", "sky-blue", "charcoal", "cream", "teal")
_ONSETS = ("k", "v", "m", "s", "t", "l", "n", "r", "d", "b", "z", "f")
_NUCLEI = ("a", "e", "i", "o", "u", "ae", "io")


def _syllable(index: int) -> str:
    onset, nucleus = divmod(index % (len(_ONSETS) * len(_NUCLEI)), len(_NUCLEI))
    return _ONSETS[onset] + _NUCLEI[nucleus]


def brand_name(brand: int) -> str:
    """A made-up, pronounceable two-syllable brand word for brand number ``brand`` (distinct for
    0 … 150: the second syllable steps by 37, coprime to the 84 syllables)."""
    return (_syllable(brand) + _syllable(37 * brand + brand // 84)).capitalize()


def item_titles(frame: pd.DataFrame) -> pd.Series:
    """One title per item of ``frame`` (the shop's columns item, category, brand, price_bucket),
    indexed by item id, sorted."""
    items = frame.drop_duplicates("item").set_index("item").sort_index()
    category = items["category"].astype(str).str.removeprefix("cat").astype(int)
    brand = items["brand"].astype(str).str.removeprefix("brand").astype(int)
    titles = [
        f"{brand_name(b)} {FINISH[int(p)]} {COLOURS[i % len(COLOURS)]} {PRODUCTS[c]}"
        for i, c, b, p in zip(items.index, category, brand, items["price_bucket"])
    ]
    return pd.Series(titles, index=items.index, name="title")
