"""The UCI Online Retail transactions: loading, cleaning, and basket-completion batches.

Source: Chen, D. (2015). Online Retail [Dataset]. UCI Machine Learning Repository,
https://doi.org/10.24432/C5BW33 (CC BY 4.0). One row per invoice line with the columns
``Description`` (product title), ``Quantity`` (negative = return), ``InvoiceDate``, ``UnitPrice``
(GBP), ``CustomerID`` (null for guests) and ``Country``; ``InvoiceNo`` and ``StockCode`` are read
when present but not needed (the product id is the title, the basket is (customer, InvoiceDate)).

- ``load_online_retail(path)``: the original ``.xlsx`` (needs openpyxl), or a ``.csv`` /
  ``.parquet`` export, checked column by column.
- ``purchases(frame)``: quantity > 0, price > 0, known customer and product, one row per
  (customer, product, day), with ``Day`` and ``Basket`` columns.
- ``RetailEvents``: every purchase as a basket-completion example — the customer, the market,
  the other items of the basket, the customer's earlier purchases, and per-(event, item) signals
  (repeat count, recency, the item's sales over the previous 30 days in all markets and in the
  event's own market) — served as ``Batch``es
  for :class:`recpeft.models.basket_ranker.BasketRanker`.

Every feature of an event on day t uses only purchases made before day t (and the other items of
the same basket), never the event's own item.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .batch import Batch
from .interactions import canonical_text, parse_timestamps

REQUIRED_COLUMNS = ("Description", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID", "Country")
OPTIONAL_COLUMNS = ("InvoiceNo", "StockCode")
TREND_DAYS = 30  # the window of the item-sales signal
RECENCY_DAYS = 30.0  # e-folding time of the repeat-recency signal
MAX_HISTORY = 64  # most recent distinct items kept per customer
MAX_BASKET = 64  # other basket items kept per event
NUM_CROSS = 4  # per-(event, item) signals: log1p(repeats), recency, log1p(trend), log1p(market trend)
NUM_CONTEXT = 2  # per-event scalars: log1p(other basket items), log1p(history items)


# ---------------------------------------------------------------------------------------------
# loading


def _read_table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    if suffix in (".xlsx", ".xls"):
        try:
            import openpyxl  # noqa: F401
        except ImportError:
            raise ImportError(
                f"{path}: reading .xlsx needs openpyxl; install it (pip install openpyxl) "
                "or export the sheet to CSV/Parquet"
            ) from None
        return pd.read_excel(path, dtype={"InvoiceNo": str, "StockCode": str})
    if suffix == ".csv":
        return pd.read_csv(path, dtype={"InvoiceNo": str, "StockCode": str, "Description": str, "Country": str})
    if suffix == ".parquet":
        return pd.read_parquet(path)
    raise ValueError(f"{path}: unknown format {suffix!r}; expected .xlsx, .csv or .parquet")


def _first_bad(mask: pd.Series) -> int:
    return int(np.flatnonzero(mask.to_numpy())[0])


def _numeric(frame: pd.DataFrame, column: str, source: str, integer: bool, nullable: bool) -> pd.Series:
    raw = frame[column]
    values = pd.to_numeric(raw, errors="coerce")
    bad = values.isna() & raw.notna()
    if not nullable:
        bad |= raw.isna()
    if integer:
        bad |= values.notna() & (values != np.round(values))
    if bad.any():
        row = _first_bad(bad)
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{source}: column {column!r}, row {row}: expected {kind}, got {raw.iloc[row]!r}")
    return values


def load_online_retail(path: str | Path, *, date_format: str | None = None) -> pd.DataFrame:
    """Read the Online Retail table from ``.xlsx``, ``.csv`` or ``.parquet``.

    ``InvoiceDate`` text is read as ``parse_timestamps`` reads it: numeric dates such as
    ``12/1/2010 8:26`` need a value that fixes the day/month order (the UCI export has days above
    12, so it is read month first) or ``date_format`` (e.g. ``"%m/%d/%Y %H:%M"``).

    Returns a DataFrame with the UCI columns ``Description`` (str), ``Quantity`` (int64),
    ``InvoiceDate`` (datetime64), ``UnitPrice`` (float64), ``CustomerID`` (float64, NaN for
    guests), ``Country`` (str), plus ``InvoiceNo`` / ``StockCode`` (str) when the file has them.
    A missing file, a missing column or a value of the wrong type raises ValueError naming the
    file, the column and the row (0-based data row, the header not counted).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    frame = _read_table(path).reset_index(drop=True)
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; the file has {list(frame.columns)}")
    source = str(path)
    out = pd.DataFrame(
        {
            "Description": frame["Description"]
            .astype("string")
            .str.strip()
            .astype(object)
            .where(frame["Description"].notna()),
            "Quantity": _numeric(frame, "Quantity", source, integer=True, nullable=False).astype("int64"),
            "UnitPrice": _numeric(frame, "UnitPrice", source, integer=False, nullable=False).astype("float64"),
            "CustomerID": _numeric(frame, "CustomerID", source, integer=True, nullable=True).astype("float64"),
        }
    )
    dates = parse_timestamps(
        frame["InvoiceDate"], lambda row: f"{path}: column 'InvoiceDate', row {row}", date_format=date_format
    )
    out.insert(2, "InvoiceDate", dates)
    country = frame["Country"]
    bad = country.isna() | (country.astype(str).str.strip() == "")
    if bad.any():
        row = _first_bad(bad)
        raise ValueError(f"{path}: column 'Country', row {row}: empty country")
    out["Country"] = country.astype(str).str.strip()
    for column in OPTIONAL_COLUMNS:
        if column in frame.columns:
            out[column] = canonical_text(frame[column]).fillna("nan")
    return out


def purchases(frame: pd.DataFrame) -> pd.DataFrame:
    """The purchases of ``frame`` (as ``load_online_retail`` returns it): Quantity > 0,
    UnitPrice > 0, known CustomerID and Description, deduplicated per (customer, product, day)
    keeping the earliest line. Adds ``Day`` (the date at midnight) and ``Basket`` (int64 id of
    (CustomerID, InvoiceDate), numbered in time order). Rows are sorted by time."""
    missing = [c for c in REQUIRED_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"purchases(frame): missing column(s) {missing}")
    keep = (
        (frame["Quantity"] > 0) & (frame["UnitPrice"] > 0) & frame["CustomerID"].notna() & frame["Description"].notna()
    )
    rows = frame.loc[keep].sort_values("InvoiceDate", kind="stable").copy()
    rows["CustomerID"] = rows["CustomerID"].astype("int64")
    rows["Day"] = rows["InvoiceDate"].dt.normalize()
    rows = rows.drop_duplicates(["CustomerID", "Description", "Day"], keep="first")
    rows["Basket"] = rows.groupby(["InvoiceDate", "CustomerID"], sort=True).ngroup().astype("int64")
    return rows.sort_values(["InvoiceDate", "CustomerID"], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------------
# the catalog: products with their title words, price and popularity


def title_words(title: str) -> list[str]:
    """Upper-case alphabetic tokens of a product title (digits and punctuation dropped)."""
    return re.findall(r"[A-Z]+", title.upper()) or ["<EMPTY>"]


@dataclass
class RetailCatalog:
    """The products and the ids every model input uses.

    Attributes:
        products: titles, index = item id (I items).
        customers: CustomerID → customer id (1…); customers not listed map to 0 ("unknown").
        markets: country names, index = market id.
        words: title vocabulary, index = word id.
        word_ids, word_offsets: the title of item i is word_ids[word_offsets[i]:word_offsets[i+1]]
            (int64, offsets [I + 1]).
        item_dense: [I, 2] float32: log(median UnitPrice), log1p(purchases in the fitting rows).
    """

    products: list[str]
    customers: dict[int, int]
    markets: list[str]
    words: list[str]
    word_ids: torch.Tensor
    word_offsets: torch.Tensor
    item_dense: torch.Tensor

    @classmethod
    def build(cls, rows: pd.DataFrame, fit_mask: np.ndarray) -> RetailCatalog:
        """Catalog of every product and market in ``rows`` (``purchases`` output); customer ids,
        popularity and prices come from the rows where ``fit_mask`` is true only (the training
        rows), so a model never holds an embedding for a customer it could not have trained and
        no feature carries later sales. A product first sold after the fitting rows takes the
        median of its own prices: its list price, which the shop knows when it lists it."""
        products = sorted(rows["Description"].unique())
        item_of = {p: i for i, p in enumerate(products)}
        fit = rows.loc[fit_mask]
        customers = {int(c): i + 1 for i, c in enumerate(sorted(fit["CustomerID"].unique()))}
        vocabulary: dict[str, int] = {}
        ids, offsets = [], [0]
        for title in products:
            for word in title_words(title):
                ids.append(vocabulary.setdefault(word, len(vocabulary)))
            offsets.append(len(ids))
        items = rows["Description"].map(item_of).to_numpy()
        all_prices = pd.Series(rows["UnitPrice"].to_numpy()).groupby(items).median().reindex(range(len(products)))
        fit_prices = pd.Series(fit["UnitPrice"].to_numpy()).groupby(items[fit_mask]).median()
        price = fit_prices.reindex(range(len(products))).fillna(all_prices)
        popularity = np.bincount(fit["Description"].map(item_of).to_numpy(), minlength=len(products))
        dense = np.stack([np.log(price.to_numpy()), np.log1p(popularity)], axis=1)
        return cls(
            products,
            customers,
            sorted(rows["Country"].unique()),
            list(vocabulary),
            torch.tensor(ids, dtype=torch.int64),
            torch.tensor(offsets, dtype=torch.int64),
            torch.tensor(dense, dtype=torch.float32),
        )

    @property
    def num_items(self) -> int:
        return len(self.products)


# ---------------------------------------------------------------------------------------------
# events


def _csr(lists: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = np.fromiter((len(x) for x in lists), dtype=np.int64, count=len(lists))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate(lists) if lists else np.zeros(0)
    return torch.from_numpy(values.astype(np.int64)), torch.from_numpy(offsets)


def _gather_csr(values: torch.Tensor, offsets: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lists ``index`` of a CSR (values, offsets) as a new CSR."""
    starts, ends = offsets[index], offsets[index + 1]
    lengths = ends - starts
    new_offsets = torch.zeros(len(index) + 1, dtype=torch.int64)
    new_offsets[1:] = torch.cumsum(lengths, 0)
    positions = torch.arange(int(new_offsets[-1])) - torch.repeat_interleave(new_offsets[:-1] - starts, lengths)
    return values[positions], new_offsets


class RetailEvents:
    """Purchases as basket-completion examples, a ``BatchSource``.

    Row n is one purchase of item t_n by customer c_n on day d_n. Its batch inputs (B rows,
    I items) are ``(customer [B], market [B], basket_ids, basket_offsets, history_ids,
    history_offsets, context [B, NUM_CONTEXT], cross [B, I, NUM_CROSS])`` and its label t_n:

    - basket: the other items of the same basket (up to MAX_BASKET);
    - history: the customer's distinct items bought on days before d_n, most recent first (up to
      MAX_HISTORY); for each, k = the number of earlier days it was bought and Δ = days since;
    - cross[b, i] = (log1p k_bi, exp(−Δ_bi / RECENCY_DAYS), log1p(sales of i over the TREND_DAYS
      days before d_b, all markets), log1p(sales of i over those days in the market of row b)),
      the first two zero for items not in the history;
    - context[b] = (log1p |basket|, log1p |history|).

    ``basket_mask(batch)`` marks the other basket items [B, I] (they cannot be the missing item).

    Build it once over all rows (histories and trends use every earlier day), then take the
    examples with ``select``.

    Args: rows (``purchases`` output), catalog.
    """

    def __init__(self, rows: pd.DataFrame, catalog: RetailCatalog):
        item_of = {p: i for i, p in enumerate(catalog.products)}
        items = rows["Description"].map(item_of).to_numpy()
        days = ((rows["Day"] - rows["Day"].min()).dt.days).to_numpy()
        customers = rows["CustomerID"].to_numpy()
        self.num_items = catalog.num_items
        self.trend = self._trend(items, days, catalog.num_items)
        market_of = {m: i for i, m in enumerate(catalog.markets)}
        markets = rows["Country"].map(market_of).to_numpy()
        self.market_day, self.market_trend_ids, self.market_trend_offsets, self.market_trend_values = (
            self._market_trend(items, days, markets, catalog.num_items)
        )
        basket_lists, history_lists, history_counts, history_ages = self._lists(
            items, days, customers, rows["Basket"].to_numpy()
        )
        self.customer = torch.tensor([catalog.customers.get(int(c), 0) for c in customers], dtype=torch.int64)
        self.market = torch.tensor(markets, dtype=torch.int64)
        self.day = torch.from_numpy(days.astype(np.int64))
        self.labels = torch.from_numpy(items.astype(np.int64))
        self.basket_ids, self.basket_offsets = _csr(basket_lists)
        self.history_ids, self.history_offsets = _csr(history_lists)
        self.history_counts = torch.from_numpy(np.concatenate(history_counts).astype(np.float32))
        self.history_ages = torch.from_numpy(np.concatenate(history_ages).astype(np.float32))
        self.context = torch.stack(
            [
                torch.log1p(torch.diff(self.basket_offsets).float()),
                torch.log1p(torch.diff(self.history_offsets).float()),
            ],
            dim=1,
        )

    def select(self, mask: np.ndarray | torch.Tensor) -> RetailEvents:
        """The events of the rows where ``mask`` [N] is true (sharing the trend table)."""
        index = torch.as_tensor(np.flatnonzero(np.asarray(mask)), dtype=torch.int64)
        out = copy.copy(self)
        out.customer, out.market, out.day, out.labels, out.context, out.market_day = (
            t[index] for t in (self.customer, self.market, self.day, self.labels, self.context, self.market_day)
        )
        out.basket_ids, out.basket_offsets = _gather_csr(self.basket_ids, self.basket_offsets, index)
        out.history_ids, out.history_offsets = _gather_csr(self.history_ids, self.history_offsets, index)
        out.history_counts = _gather_csr(self.history_counts, self.history_offsets, index)[0]
        out.history_ages = _gather_csr(self.history_ages, self.history_offsets, index)[0]
        return out

    @staticmethod
    def _trend(items: np.ndarray, days: np.ndarray, num_items: int) -> torch.Tensor:
        """[num_days, I]: log1p of each item's sales over the TREND_DAYS days before each day."""
        num_days = int(days.max()) + 1
        daily = np.zeros((num_days + 1, num_items), dtype=np.float32)
        np.add.at(daily, (days + 1, items), 1.0)  # row d + 1 = sales on day d
        cumulative = np.cumsum(daily, axis=0)  # row d = sales on days < d
        lagged = np.concatenate([np.zeros((TREND_DAYS, num_items), np.float32), cumulative[:-TREND_DAYS]])[:num_days]
        return torch.from_numpy(np.log1p(cumulative[:num_days] - lagged))

    @staticmethod
    def _market_trend(items, days, markets, num_items):
        """Per row, the id of its (market, day) pair [N]; per pair, the items sold in that market
        over the TREND_DAYS days before that day as a CSR (ids, offsets [pairs + 1]) with their
        log1p(sales) values (float32). Sparse: a small market sells few items in a month."""
        pair_of_row = np.empty(len(items), dtype=np.int64)
        ids, values, lengths = [], [], []
        for market in np.unique(markets):
            own = np.flatnonzero(markets == market)
            event_days = np.unique(days[own])
            horizon = int(event_days.max()) + 1
            daily = np.zeros((horizon + 1, num_items), dtype=np.float32)
            np.add.at(daily, (days[own] + 1, items[own]), 1.0)  # row d + 1 = sales on day d
            cumulative = np.cumsum(daily, axis=0)  # row d = sales on days < d
            window = cumulative[event_days] - cumulative[np.maximum(event_days - TREND_DAYS, 0)]
            pair_of_row[own] = len(lengths) + np.searchsorted(event_days, days[own])
            for sales in window:
                sold = np.flatnonzero(sales)
                ids.append(sold)
                values.append(np.log1p(sales[sold]))
                lengths.append(len(sold))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return (
            torch.from_numpy(pair_of_row),
            torch.from_numpy(np.concatenate(ids).astype(np.int64)),
            torch.from_numpy(offsets),
            torch.from_numpy(np.concatenate(values).astype(np.float32)),
        )

    @staticmethod
    def _lists(items, days, customers, baskets):
        """Per row: other basket items; history items, their day counts and ages."""
        by_basket: dict[int, list[int]] = {}
        for n, b in enumerate(baskets):
            by_basket.setdefault(int(b), []).append(n)
        # customer state before each (customer, day): item → (days bought, last day)
        snapshots: dict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        state: dict[int, dict[int, list[int]]] = {}
        pending: dict[int, tuple[int, list[int]]] = {}
        for n in np.argsort(days, kind="stable"):
            c, d = int(customers[n]), int(days[n])
            last = pending.get(c)
            if last is None or last[0] != d:
                if last is not None:  # the previous day enters the history
                    seen = state.setdefault(c, {})
                    for i in last[1]:
                        entry = seen.setdefault(i, [0, last[0]])
                        entry[0] += 1
                        entry[1] = last[0]
                seen = state.get(c, {})
                recent = sorted(seen.items(), key=lambda kv: -kv[1][1])[:MAX_HISTORY]
                snapshots[(c, d)] = (
                    np.array([i for i, _ in recent], dtype=np.int64),
                    np.array([v[0] for _, v in recent], dtype=np.float32),
                    np.array([d - v[1] for _, v in recent], dtype=np.float32),
                )
                pending[c] = (d, [])
            pending[c][1].append(int(items[n]))
        basket_lists, history_lists, counts, ages = [], [], [], []
        for n in range(len(items)):
            others = [int(items[m]) for m in by_basket[int(baskets[n])] if m != n][:MAX_BASKET]
            basket_lists.append(np.array(others, dtype=np.int64))
            ids, k, age = snapshots[(int(customers[n]), int(days[n]))]
            history_lists.append(ids)
            counts.append(k)
            ages.append(age)
        return basket_lists, history_lists, counts, ages

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def cross(
        self, index: torch.Tensor, history: tuple[torch.Tensor, torch.Tensor], counts: torch.Tensor, ages: torch.Tensor
    ) -> torch.Tensor:
        """[B, I, NUM_CROSS] signals of the rows ``index`` (see the class docstring)."""
        ids, offsets = history
        rows = torch.repeat_interleave(torch.arange(len(index)), torch.diff(offsets))
        cross = torch.zeros(len(index), self.num_items, NUM_CROSS)
        cross[rows, ids, 0] = torch.log1p(counts)
        cross[rows, ids, 1] = torch.exp(-ages / RECENCY_DAYS)
        cross[:, :, 2] = self.trend[self.day[index]]
        pair = self.market_day[index]
        sold, sold_offsets = _gather_csr(self.market_trend_ids, self.market_trend_offsets, pair)
        values = _gather_csr(self.market_trend_values, self.market_trend_offsets, pair)[0]
        cross[torch.repeat_interleave(torch.arange(len(index)), torch.diff(sold_offsets)), sold, 3] = values
        return cross

    def batch(self, index: torch.Tensor) -> Batch:
        index = torch.as_tensor(index, dtype=torch.int64)
        basket = _gather_csr(self.basket_ids, self.basket_offsets, index)
        history = _gather_csr(self.history_ids, self.history_offsets, index)
        counts = _gather_csr(self.history_counts, self.history_offsets, index)[0]
        ages = _gather_csr(self.history_ages, self.history_offsets, index)[0]
        args = (
            self.customer[index],
            self.market[index],
            *basket,
            *history,
            self.context[index],
            self.cross(index, history, counts, ages),
        )
        return Batch(args, self.labels[index])

    def basket_mask(self, index: torch.Tensor) -> torch.Tensor:
        """[B, I] bool: the other items of each row's basket."""
        index = torch.as_tensor(index, dtype=torch.int64)
        ids, offsets = _gather_csr(self.basket_ids, self.basket_offsets, index)
        mask = torch.zeros(len(index), self.num_items, dtype=torch.bool)
        mask[torch.repeat_interleave(torch.arange(len(index)), torch.diff(offsets)), ids] = True
        return mask
