"""The Online Retail loader, its purchase cleaning, the basket-completion features and BasketRanker,
on a small file in the UCI format written here (never the real data)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft import LoraAdamW, LoraConfig, get_peft_model
from recpeft.datasets.online_retail import (
    MAX_BASKET,
    MAX_HISTORY,
    NUM_CONTEXT,
    NUM_CROSS,
    RECENCY_DAYS,
    TREND_DAYS,
    RetailCatalog,
    RetailEvents,
    load_online_retail,
    purchases,
    title_words,
)
from recpeft.models.basket_ranker import BasketRanker

from reference_math import assert_normwise_close

WORDS = ["RED", "HEART", "LANTERN", "CUP", "TEA", "SET", "VINTAGE", "BAG", "CANDLE", "BOX"]


def retail_frame(seed: int, lines: int = 400) -> pd.DataFrame:
    """Random invoice lines in the UCI layout, with returns, zero prices, guests and same-day
    repeats among them."""
    rng = np.random.default_rng(seed)
    titles = sorted({" ".join(rng.choice(WORDS, size=rng.integers(1, 4))) + f" {k}" for k in range(25)})
    invoices = []
    for n in range(60):
        customer = float(rng.integers(12000, 12012)) if rng.random() > 0.1 else math.nan
        when = pd.Timestamp("2011-01-01") + pd.Timedelta(days=int(rng.integers(0, 90)), hours=int(rng.integers(8, 18)))
        invoices.append((f"{536000 + n}", customer, when, rng.choice(["France", "Spain", "Germany"])))
    rows = []
    for _ in range(lines):
        invoice, customer, when, country = invoices[rng.integers(len(invoices))]
        rows.append(
            {
                "InvoiceNo": invoice,
                "StockCode": f"S{rng.integers(100)}",
                "Description": titles[rng.integers(len(titles))],
                "Quantity": int(rng.choice([-2, 1, 3, 6, 12])),
                "InvoiceDate": when,
                "UnitPrice": float(rng.choice([0.0, 0.85, 1.25, 2.95, 4.5])),
                "CustomerID": customer,
                "Country": country,
            }
        )
    return pd.DataFrame(rows)


@pytest.fixture
def frame():
    return retail_frame(seed=int(np.random.default_rng().integers(1 << 30)))


def test_load_csv_and_parquet(tmp_path, frame):
    frame.to_csv(tmp_path / "retail.csv", index=False)
    frame.to_parquet(tmp_path / "retail.parquet")
    for name in ("retail.csv", "retail.parquet"):
        loaded = load_online_retail(tmp_path / name)
        assert len(loaded) == len(frame)
        assert loaded["Quantity"].dtype == np.int64 and loaded["InvoiceDate"].dtype.kind == "M"
        assert (loaded["Quantity"].to_numpy() == frame["Quantity"].to_numpy()).all()
        assert (loaded["InvoiceDate"].to_numpy() == frame["InvoiceDate"].to_numpy()).all()
        np.testing.assert_array_equal(loaded["CustomerID"].to_numpy(), frame["CustomerID"].to_numpy())
        assert list(loaded["InvoiceNo"]) == list(frame["InvoiceNo"])


def test_load_without_optional_columns(tmp_path, frame):
    frame.drop(columns=["InvoiceNo", "StockCode"]).to_csv(tmp_path / "retail.csv", index=False)
    loaded = load_online_retail(tmp_path / "retail.csv")
    assert "InvoiceNo" not in loaded and len(loaded) == len(frame)


def test_load_errors_name_file_column_and_row(tmp_path, frame):
    path = tmp_path / "retail.csv"
    frame.drop(columns=["UnitPrice"]).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"retail\.csv.*missing column.*UnitPrice"):
        load_online_retail(path)
    bad = frame.astype({"Quantity": object})
    bad.loc[7, "Quantity"] = "twelve"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"retail\.csv: column 'Quantity', row 7: expected an integer, got 'twelve'"):
        load_online_retail(path)
    bad = frame.astype({"InvoiceDate": object})
    bad.loc[11, "InvoiceDate"] = "not a date"
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"column 'InvoiceDate', row 11"):
        load_online_retail(path)
    bad = frame.copy()
    bad.loc[3, "CustomerID"] = 12000.5
    bad.to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"column 'CustomerID', row 3"):
        load_online_retail(path)
    with pytest.raises(ValueError, match="no such file"):
        load_online_retail(tmp_path / "absent.csv")
    (tmp_path / "retail.json").write_text("{}")
    with pytest.raises(ValueError, match=r"retail\.json: unknown format"):
        load_online_retail(tmp_path / "retail.json")


def test_xlsx_reads_like_csv(tmp_path, frame):
    """The original UCI file is .xlsx: it loads to the same table as a CSV export of it."""
    frame.to_excel(tmp_path / "Online Retail.xlsx", index=False)
    frame.to_csv(tmp_path / "retail.csv", index=False)
    pd.testing.assert_frame_equal(
        load_online_retail(tmp_path / "Online Retail.xlsx"),
        load_online_retail(tmp_path / "retail.csv"),
        check_dtype=False,
    )


def test_xlsx_without_openpyxl_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "openpyxl", None)  # as if it were not installed
    path = tmp_path / "Online Retail.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(ImportError, match="openpyxl"):
        load_online_retail(path)


def test_purchases_match_a_brute_force_cleaning(frame):
    rows = purchases(frame)
    expected = {}
    for line in frame.sort_values("InvoiceDate", kind="stable").itertuples():
        if line.Quantity > 0 and line.UnitPrice > 0 and not math.isnan(line.CustomerID):
            key = (int(line.CustomerID), line.Description, line.InvoiceDate.normalize())
            expected.setdefault(key, line.InvoiceDate)
    got = {
        (c, d, day): t
        for c, d, day, t in zip(rows["CustomerID"], rows["Description"], rows["Day"], rows["InvoiceDate"])
    }
    assert got == expected and len(rows) == len(expected)
    # one basket id per (customer, InvoiceDate), numbered in time order
    pairs = rows.groupby("Basket")[["CustomerID", "InvoiceDate"]].nunique()
    assert (pairs == 1).all().all()
    assert rows.groupby(["CustomerID", "InvoiceDate"])["Basket"].nunique().max() == 1
    first_time = rows.groupby("Basket")["InvoiceDate"].min()
    assert first_time.is_monotonic_increasing


def brute_force_features(rows: pd.DataFrame, catalog: RetailCatalog, n: int) -> dict:
    """The features of row n straight from their definitions."""
    item_of = {p: i for i, p in enumerate(catalog.products)}
    row = rows.iloc[n]
    day = row["Day"]
    others = [
        item_of[d] for m, d in zip(rows.index, rows["Description"]) if rows.at[m, "Basket"] == row["Basket"] and m != n
    ]
    earlier = rows[(rows["CustomerID"] == row["CustomerID"]) & (rows["Day"] < day)]
    history = {}
    for d, when in zip(earlier["Description"], earlier["Day"]):
        count, last = history.get(item_of[d], (0, None))
        history[item_of[d]] = (count + 1, when if last is None else max(last, when))
    window = rows[(rows["Day"] < day) & (rows["Day"] >= day - pd.Timedelta(days=TREND_DAYS))]
    trend, market_trend = np.zeros(catalog.num_items), np.zeros(catalog.num_items)
    for d, country in zip(window["Description"], window["Country"]):
        trend[item_of[d]] += 1
        market_trend[item_of[d]] += country == row["Country"]
    return {
        "basket": others,
        "history": history,
        "trend": np.log1p(trend),
        "market_trend": np.log1p(market_trend),
        "day": day,
    }


def test_events_match_brute_force(frame):
    rows = purchases(frame)
    fit = (rows["InvoiceDate"] < pd.Timestamp("2011-03-01")).to_numpy()
    catalog = RetailCatalog.build(rows, fit)
    events = RetailEvents(rows, catalog)
    chosen = np.flatnonzero(~fit)
    some = events.select(~fit)
    rng = np.random.default_rng()
    picks = rng.choice(len(chosen), size=min(12, len(chosen)), replace=False)
    batch = some.batch(torch.as_tensor(picks))
    customer, market, basket_ids, basket_offsets, history_ids, history_offsets, context, cross = batch.args
    assert cross.shape == (len(picks), catalog.num_items, NUM_CROSS) and context.shape == (len(picks), NUM_CONTEXT)
    for b, p in enumerate(picks):
        n = int(chosen[p])
        truth = brute_force_features(rows, catalog, n)
        assert int(batch.labels[b]) == catalog.products.index(rows.at[n, "Description"])
        assert sorted(basket_ids[basket_offsets[b] : basket_offsets[b + 1]].tolist()) == sorted(
            truth["basket"][:MAX_BASKET]
        )
        ids = history_ids[history_offsets[b] : history_offsets[b + 1]].tolist()
        assert len(truth["history"]) <= MAX_HISTORY and sorted(ids) == sorted(truth["history"])
        expected = np.zeros((catalog.num_items, NUM_CROSS))
        for i, (count, last) in truth["history"].items():
            expected[i, 0] = math.log1p(count)
            expected[i, 1] = math.exp(-(truth["day"] - last).days / RECENCY_DAYS)
        expected[:, 2] = truth["trend"]
        expected[:, 3] = truth["market_trend"]
        np.testing.assert_allclose(cross[b].double().numpy(), expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            context[b].tolist(), [math.log1p(len(truth["basket"])), math.log1p(len(truth["history"]))], rtol=1e-6
        )
        known = catalog.customers.get(int(rows.at[n, "CustomerID"]), 0)
        assert int(customer[b]) == known and catalog.markets[int(market[b])] == rows.at[n, "Country"]
    mask = some.basket_mask(torch.as_tensor(picks))
    assert mask.sum() == len(basket_ids)
    # the catalog: titles tokenised, customers numbered from the fitting rows only, price = median
    assert catalog.words == list(dict.fromkeys(w for t in catalog.products for w in title_words(t)))
    assert set(catalog.customers) == set(rows.loc[fit, "CustomerID"]) and 0 not in catalog.customers.values()
    # price: the median over the fitting rows; a product sold only later, the median of its own rows
    for item in range(catalog.num_items):
        own = (rows["Description"] == catalog.products[item]).to_numpy()
        prices = rows.loc[own & fit, "UnitPrice"] if (own & fit).any() else rows.loc[own, "UnitPrice"]
        assert catalog.item_dense[item, 0].item() == pytest.approx(math.log(prices.median()), rel=1e-5)


def small_ranker(seed: int, frame: pd.DataFrame):
    rows = purchases(frame)
    catalog = RetailCatalog.build(rows, np.ones(len(rows), dtype=bool))
    torch.manual_seed(seed)
    model = BasketRanker(
        len(catalog.customers) + 1,
        len(catalog.markets),
        len(catalog.words),
        catalog.word_ids,
        catalog.word_offsets,
        catalog.item_dense,
        num_context=NUM_CONTEXT,
        num_cross=NUM_CROSS,
        dim=8,
        hidden=16,
        dropout=0.0,
    )
    return model, RetailEvents(rows, catalog)


def test_ranker_matches_its_formula_in_float64(frame):
    model, events = small_ranker(0, frame)
    index = torch.randperm(len(events))[:9]
    batch = events.batch(index)
    customer, market, basket_ids, basket_offsets, history_ids, history_offsets, context, cross = batch.args
    w = {k: v.double() for k, v in model.state_dict().items()}

    def pool(table, ids, offsets, b):
        part = ids[offsets[b] : offsets[b + 1]]
        return table[part].mean(0) if len(part) else torch.zeros(table.shape[1], dtype=torch.float64)

    def mlp(prefix, x):
        hidden = torch.relu(x @ w[f"{prefix}.0.weight"].T + w[f"{prefix}.0.bias"])
        return hidden @ w[f"{prefix}.3.weight"].T + w[f"{prefix}.3.bias"]

    dense = model.item_dense.double()
    titles = torch.stack(
        [
            pool(
                w["words.weight"],
                model.item_word_ids,
                torch.cat([model.item_word_offsets, torch.tensor([len(model.item_word_ids)])]),
                i,
            )
            for i in range(dense.shape[0])
        ]
    )
    v = mlp("item_mlp", torch.cat([w["items.weight"], titles, dense], 1))
    expected = torch.empty(len(index), dense.shape[0], dtype=torch.float64)
    for b in range(len(index)):
        x = torch.cat(
            [
                w["customers.weight"][customer[b]],
                w["markets.weight"][market[b]],
                pool(w["basket.weight"], basket_ids, basket_offsets, b),
                pool(w["history.weight"], history_ids, history_offsets, b),
                context[b].double(),
            ]
        )
        out = mlp("context_mlp", x)
        u, weights = out[:-NUM_CROSS], out[-NUM_CROSS:]
        expected[b] = v @ u + cross[b].double() @ weights
    model.eval()
    assert_normwise_close(model(*batch.args), expected, name="ranker")  # products of computed values: see there
    assert "item_dense" not in model.state_dict() and "item_word_ids" not in model.state_dict()


def test_ranker_lora_trains_sparsely_and_merges(frame, tmp_path):
    model, events = small_ranker(1, frame)
    model.eval()
    index = torch.randperm(len(events))[:16]
    batch = events.batch(index)
    before = model(*batch.args).detach()
    targets = [
        "customers",
        "markets",
        "basket",
        "history",
        "context_mlp.0",
        "context_mlp.3",
        "item_mlp.0",
        "item_mlp.3",
    ]
    peft = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=targets))
    torch.testing.assert_close(peft(*batch.args), before, rtol=0, atol=0)  # B zero / A zero: the base's ops
    optimizer = LoraAdamW([p for p in peft.parameters() if p.requires_grad], lr=0.05)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(peft(*batch.args), batch.labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = peft(*batch.args).detach()
    assert (after - before).abs().max() > 1e-4
    peft.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    prefix = next(k for k in tensors if ".customers.lora_embedding_A." in k).rsplit(".", 1)[0]
    if prefix + ".indices" in tensors:  # sparse form: the touched rows only
        stored = set(tensors[prefix + ".indices"].tolist())
    else:  # dense form, when it is the smaller one
        stored = set(torch.nonzero(tensors[prefix + ".weight"].abs().sum(1)).flatten().tolist())
    assert stored == set(batch.args[0].tolist())
    merged = peft.merge_and_unload()
    assert_normwise_close(merged(*batch.args), after, name="merged")


def benchmark_module(name: str = "quality_online_retail"):
    """benchmarks/<name>.py, imported from its path (benchmarks/ is no package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_benchmark_loss_and_sampled_auc_match_their_formulas(frame):
    bench = benchmark_module()
    model, events = small_ranker(2, frame)
    model.eval()
    index = torch.randperm(len(events))[:10]
    batch = bench.TrainingRows(events).batch(index)
    weight, draws = float(np.random.default_rng().uniform(0.3, 2.0)), 7
    torch.manual_seed(5)
    got = bench.make_loss(weight, draws)(model, batch)
    torch.manual_seed(5)
    logits = model(*batch.args).detach().double()  # the same draws: the loss draws after the forward
    negatives = torch.randint(logits.shape[1], (len(index), draws))
    mask, history = batch.kwargs["basket_mask"], batch.args[-1][:, :, 0] > 0
    ce, gaps, kept = 0.0, 0.0, 0
    for b in range(len(index)):
        t = int(batch.labels[b])
        allowed = [i for i in range(logits.shape[1]) if not mask[b, i]]
        ce += -(logits[b, t] - torch.logsumexp(logits[b, allowed], 0)) / len(index)
        for n in negatives[b].tolist():
            if n != t and not mask[b, n] and not history[b, n]:
                gaps, kept = gaps + math.log1p(math.exp(logits[b, n] - logits[b, t])), kept + 1
    assert got.item() == pytest.approx(float(ce) + weight * gaps / max(kept, 1), rel=1e-4)
    # sampled AUC: the share of (purchase, negative) pairs ordered right, all rows pooled, ties half
    scores = torch.randn(6, 20).round(decimals=1)
    targets, sampled = torch.randint(20, (6,)), torch.randint(20, (6, 3))
    pos = [float(scores[r, targets[r]]) for r in range(6)]
    neg = [float(scores[r, j]) for r in range(6) for j in sampled[r].tolist()]
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg]
    assert bench.sampled_auc(scores, targets, sampled) == pytest.approx(sum(pairs) / len(pairs))


def test_the_command_line_benchmarks_click_log_pairs_each_purchase_with_a_non_purchase(frame):
    log = benchmark_module("cli_new_markets").click_log(frame)
    bought = purchases(frame).assign(product=lambda f: f["Description"].str.strip())
    clicks, others = log[log["clicked"] == 1], log[log["clicked"] == 0]
    key = ["CustomerID", "product", "Country", "InvoiceDate"]
    assert sorted(map(tuple, clicks[key].to_numpy())) == sorted(map(tuple, bought[key].to_numpy()))
    assert 0.9 * len(clicks) <= len(others) <= len(clicks)  # one each, less the rare repeated hits
    days = set(zip(bought["CustomerID"], bought["product"], bought["Day"]))
    shown_days = others["InvoiceDate"].dt.normalize()
    assert not any(k in days for k in zip(others["CustomerID"], others["product"], shown_days))
    shown = set(map(tuple, others[["CustomerID", "Country", "InvoiceDate"]].to_numpy()))
    assert shown <= set(map(tuple, bought[["CustomerID", "Country", "InvoiceDate"]].to_numpy()))
    assert set(others["product"]) <= set(bought["product"])
    prices = bought.groupby("product")["UnitPrice"].median()
    assert np.allclose(log["price"].to_numpy(), log["product"].map(prices).to_numpy())
    assert (log["kind"] == log["product"].str.split().str[-2]).all()  # "RED HEART 7": the last word of letters
    assert log["InvoiceDate"].is_monotonic_increasing


def test_benchmark_pool_rows_and_repeated_fit_match_a_refit_on_the_pool(frame):
    """The benchmark's repeated-holdout path: Pool.rows(index) is events.select at index, and
    fit(..., repeats=K) returns the model a plain Trainer trains on the whole pool for the chosen
    epochs + 1 (the same seed), its history the mean of its holdout curves."""
    from recpeft.train import TrainConfig, Trainer

    bench = benchmark_module()
    model, events = small_ranker(3, frame)
    n = len(events)
    index = torch.sort(torch.randperm(n)[: n // 2]).values
    mask = torch.zeros(n, dtype=torch.bool)
    mask[index] = True
    negatives = torch.randint(int(events.labels.max()) + 1, (n, 3))
    baskets = torch.randint(max(2, n // 4), (n,))
    pool = bench.Pool(events, negatives, baskets, valid=n // 4)
    got, want = pool.rows(index), events.select(mask)
    for name in ("customer", "market", "labels", "basket_ids", "basket_offsets", "history_ids"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    # the one-slice rows differ from the pool's, so a refit on them would not match
    split = bench.Split(events.select(~mask), bench.ScoredRows(events.select(mask), negatives[index]), pool=pool)
    new_model = lambda: small_ranker(3, frame)[0]  # noqa: E731
    loss = bench.make_loss(1.0, 4)
    fitted, report = bench.fit(new_model, split, 1e-2, 0.0, 3, 32, 2, loss, True, 7, "t", False, 0.0, repeats=2)
    assert len(report["holdouts"]) == 2 and report["pool_rows"] == n
    curves = torch.tensor(report["holdouts"])
    assert torch.allclose(curves.mean(0), torch.tensor(report["history"]), atol=2e-5)  # both rounded to 1e-5
    assert report["epochs"] == report["best_epoch"] + 1
    reference = new_model()
    if report["best_epoch"] >= 0:
        config = TrainConfig(epochs=3, batch_size=32, lr=1e-2, weight_decay=0.0, seed=7, progress=False)
        config = dataclasses.replace(config, stop_after_epochs=report["epochs"])
        Trainer(reference, config, loss_fn=loss).fit(bench.TrainingRows(events), resume=False)
    for (name, a), b in zip(fitted.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
