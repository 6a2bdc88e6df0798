"""The command line on real data: six markets of UCI Online Retail that the base never saw, their
adapters with and without rows for their new customers (``finetune --new-id-rows``).

Click log, built from the purchases (:func:`recpeft.datasets.online_retail.purchases`: one row per
customer, product and day): every purchase is a click (1); each gets one non-click (0) of the same
customer, time and market, a product drawn by popularity (every market's purchase counts before
the split, four fifths of them British) that the customer did not buy that day: what a shop
shows everyone. Columns: ``CustomerID`` (user), ``product`` (item, the title),
``kind`` (the title's last word, HOLDER or LANTERN: an attribute), ``price`` (the product's median
unit price), ``Country`` (the segment), ``InvoiceDate`` and ``clicked``. A new market's adapter has
to learn what that market buys among what everyone is shown, and with new-id rows what each of
its customers buys. (Drawn by each market's own popularity instead, a product is as often a click
as not within its market; tried once, seed 0: the base scored 0.44–0.48 and no adapter beat it on
validation in four of the six markets, so the adapters stayed the base there.)

Per seed, through ``recpeft.cli.main`` with the command line's defaults (nothing here was tuned,
on any rows):

1. ``pretrain`` without the six markets (``--exclude-segments``), ``--new-id-share 0.05``, the
   test cut at 2011-09-01;
2. ``finetune --segments <six> --method lora,dense``: LoRA on the default targets and dense
   fine-tuning; each market's customers are new to the base and share its new-id row;
3. ``finetune --segments <six> --new-id-rows CustomerID``: LoRA whose adapter gives every
   customer of the market's training rows a row of its own;
4. the same with ``--target-modules auto``: the targets, rank and learning rate chosen per market
   on its validation rows, new-id rows one candidate among the others.

Test AUC and LogLoss per market from each run's ``summary.json``; mean over seeds, every seed
reported. Writes ``benchmarks/results/cli_new_markets.json`` and ``.png``.

    python benchmarks/cli_new_markets.py [--data ../shared/data/online_retail.parquet] [--seeds 3]

Data: Chen, D. (2015). Online Retail. UCI Machine Learning Repository, doi:10.24432/C5BW33, CC BY 4.0.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from recpeft.apps.demo_report import figure, print_table, save_figure, save_report
from recpeft.cli import main
from recpeft.datasets.online_retail import load_online_retail, purchases

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "online_retail.parquet"
RESULTS = ROOT / "benchmarks" / "results"
SPLIT = "2011-09-01"
MARKETS = ("Germany", "France", "Spain", "Belgium", "Switzerland", "Portugal")
NEW_ID_SHARE = 0.05
LOG_SEED = 12345  # the non-clicks' draw: the same log for every seed
ROLES = ["--user", "CustomerID", "--item", "product", "--label", "clicked", "--segment-col", "Country"]
ROLES += ["--timestamp", "InvoiceDate", "--categorical", "kind", "--dense", "price", "--quiet"]
#: arm → (summary folder, method in it)
ARMS = {
    "lora": ("plain", "lora"),
    "dense": ("plain", "dense"),
    "lora_new_ids": ("new_ids", "lora"),
    "auto_new_ids": ("auto", "lora"),
}


def click_log(raw: pd.DataFrame) -> pd.DataFrame:
    """The purchases as clicks, each with one non-click drawn by popularity before the split (every
    market's purchases), redrawn once where the customer bought that product that day and dropped
    if it hits again (module docstring)."""
    rows = purchases(raw)
    rows = rows.assign(product=rows["Description"].str.strip())
    popularity = rows.loc[rows["InvoiceDate"] < pd.Timestamp(SPLIT), "product"].value_counts()
    products, share = popularity.index.to_numpy(), (popularity / popularity.sum()).to_numpy()
    rng = np.random.default_rng(LOG_SEED)
    bought = set(zip(rows["CustomerID"], rows["product"], rows["Day"]))
    hit = lambda picks: np.array([key in bought for key in zip(rows["CustomerID"], picks, rows["Day"])])
    drawn = rng.choice(products, size=len(rows), p=share)
    again = hit(drawn)
    drawn[again] = rng.choice(products, size=int(again.sum()), p=share)
    clicks = rows[["CustomerID", "product", "Country", "InvoiceDate"]].assign(clicked=1)
    others = clicks.assign(product=drawn, clicked=0)[~hit(drawn)]
    log = pd.concat([clicks, others], ignore_index=True).sort_values("InvoiceDate", kind="stable")
    log["price"] = log["product"].map(rows.groupby("product")["UnitPrice"].median()).astype("float64")
    log["kind"] = log["product"].str.extract(r"([A-Z]+)[^A-Z]*$", expand=False).fillna("")
    return log.reset_index(drop=True)


def run_seed(log: Path, work: Path, seed: int) -> dict:
    """Pretrain and both fine-tunes for ``seed``; per market each arm's test AUC and LogLoss."""
    common = [*ROLES, "--seed", str(seed)]
    base = work / f"base_{seed}"
    markets = ",".join(MARKETS)
    pretrain = ["pretrain", str(log), *common, "--exclude-segments", markets, "--new-id-share", str(NEW_ID_SHARE)]
    assert main([*pretrain, "--test-start", SPLIT, "--output", str(base)]) == 0
    finetune = ["finetune", str(log), *common, "--base", str(base), "--segments", markets]
    assert main([*finetune, "--method", "lora,dense", "--output", str(work / f"plain_{seed}")]) == 0
    assert main([*finetune, "--new-id-rows", "CustomerID", "--output", str(work / f"new_ids_{seed}")]) == 0
    auto = [*finetune, "--new-id-rows", "CustomerID", "--target-modules", "auto"]
    assert main([*auto, "--output", str(work / f"auto_{seed}")]) == 0
    summaries = {
        name: {r["segment"]: r for r in json.loads((work / f"{name}_{seed}" / "summary.json").read_text())["segments"]}
        for name in ("plain", "new_ids", "auto")
    }
    result = {}
    for market in MARKETS:
        plain = summaries["plain"][market]
        entry = {"test_rows": plain["test_rows"], "train_rows": plain["train_rows"]}
        entry["base"] = {"auc": plain["base_auc"], "log_loss": plain["base_log_loss"]}
        for arm, (name, method) in ARMS.items():
            row = summaries[name][market]
            entry[arm] = {"auc": row[f"{method}_auc"], "log_loss": row[f"{method}_log_loss"],
                          "bytes": row[f"{method}_bytes"], "best_epoch": row[f"{method}_best_epoch"]}  # fmt: skip
        new_ids = work / f"new_ids_{seed}" / market / "new_ids.json"
        values = json.loads(new_ids.read_text())["values"]["CustomerID"] if new_ids.is_file() else []
        entry["new_customers"] = len(values)
        search = json.loads((work / f"auto_{seed}" / market / "target_search.json").read_text())
        entry["auto_chose"] = {k: search["probes"][0][k] for k in ("targets", "r", "lr")}
        result[market] = entry
    result["base_bytes"] = sum(f.stat().st_size for f in base.iterdir() if f.is_file())
    return result


def summarise(per_seed: dict[int, dict]) -> dict:
    """Per market and arm the mean over seeds of AUC and LogLoss, and the gains over the base."""
    means = {}
    for market in MARKETS:
        entries = [per_seed[s][market] for s in per_seed]
        means[market] = {
            arm: {k: float(np.mean([e[arm][k] for e in entries])) for k in ("auc", "log_loss")}
            for arm in ("base", *ARMS)
        }
        for arm in ARMS:
            means[market][f"{arm}_minus_base_auc"] = means[market][arm]["auc"] - means[market]["base"]["auc"]
        means[market]["new_customers"] = float(np.mean([e["new_customers"] for e in entries]))
    return means


COLUMNS = [
    ("market", 12, lambda r: r["market"]),
    ("base AUC", 8, lambda r: figure(r["base"]["auc"], ".4f")),
    ("LoRA", 8, lambda r: figure(r["lora"]["auc"], ".4f")),
    ("LoRA + new ids", 14, lambda r: figure(r["lora_new_ids"]["auc"], ".4f")),
    ("auto + new ids", 14, lambda r: figure(r["auto_new_ids"]["auc"], ".4f")),
    ("dense", 8, lambda r: figure(r["dense"]["auc"], ".4f")),
    ("new customers", 13, lambda r: figure(r["new_customers"], ",.0f")),
]
LEGEND = "test AUC after 2011-09-01, mean over seeds; new customers: rows the new-id adapter gave its own"


def plot(means: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(10, 4))
    arms = [("lora", "LoRA"), ("lora_new_ids", "LoRA + new-id rows"), ("auto_new_ids", "auto + new-id rows")]
    arms.append(("dense", "dense"))
    width, x = 0.2, np.arange(len(MARKETS))
    for i, (arm, label) in enumerate(arms):
        axis.bar(x + (i - 1.5) * width, [means[m][f"{arm}_minus_base_auc"] for m in MARKETS], width, label=label)
    axis.axhline(0, color="black", linewidth=0.8)
    axis.set_xticks(x, MARKETS)
    axis.set_ylabel("test AUC − base")
    axis.set_title("recpeft CLI on Online Retail: six markets the base never saw")
    axis.legend(fontsize=8)
    save_figure(fig, path)


def run(data: Path, seeds: int, out: Path) -> dict:
    start = time.perf_counter()
    log_frame = click_log(load_online_retail(data))
    per_seed = {}
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "clicks.parquet"
        log_frame.to_parquet(log)
        for seed in tqdm(range(seeds), desc="seeds", unit="seed"):
            per_seed[seed] = run_seed(log, Path(tmp), seed)
    means = summarise(per_seed)
    report = {
        "benchmark": "cli_new_markets",
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "data": {"file": data.name, "clicks": int(log_frame["clicked"].sum()), "rows": len(log_frame), "split": SPLIT},
        "markets": list(MARKETS),
        "new_id_share": NEW_ID_SHARE,
        "seeds": seeds,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "seconds": time.perf_counter() - start,
        "mean": means,
        "per_seed": per_seed,
    }
    print_table([{"market": m, **means[m]} for m in MARKETS], COLUMNS, LEGEND)
    save_report(out.with_suffix(".json"), report)
    plot(means, out.with_suffix(".png"))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.png')} ({report['seconds']:.0f} s)")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--output", type=Path, default=RESULTS / "cli_new_markets")
    args = parser.parse_args()
    run(args.data, args.seeds, args.output)
