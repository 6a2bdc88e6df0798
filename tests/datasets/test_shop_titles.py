"""The shop's product titles are a pure function of the catalogue: one per item, the same in
every run, naming the item's own category, brand and price level."""

from __future__ import annotations

import pandas as pd

from recpeft.datasets.shop_titles import FINISH, PRODUCTS, brand_name, item_titles
from recpeft.datasets.synthetic import load_shop


def test_every_item_gets_a_title_that_names_its_own_attributes():
    frame = load_shop()
    titles = item_titles(frame)
    assert titles.index.tolist() == sorted(frame["item"].unique())
    items = frame.drop_duplicates("item").set_index("item")
    for item in (0, 17, 2999):
        row = items.loc[item]
        title = titles.loc[item]
        assert title.startswith(brand_name(int(str(row["brand"]).removeprefix("brand"))) + " ")
        assert title.endswith(PRODUCTS[int(str(row["category"]).removeprefix("cat"))])
        assert FINISH[int(row["price_bucket"])] in title.split()


def test_titles_are_the_same_every_time_and_brands_are_distinct():
    frame = load_shop()
    shuffled = frame.sample(frac=1.0, random_state=3)
    pd.testing.assert_series_equal(item_titles(frame), item_titles(shuffled))  # row order does not matter
    assert len({brand_name(b) for b in range(151)}) == 151
