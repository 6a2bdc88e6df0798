"""Personalization on real data: the UCI Online Retail transactions, one LoRA adapter per country.

Protocol (issue 6, "Real data"): purchases (quantity > 0, price > 0, known customer) deduplicated
per (customer, product, day); markets = countries; time split at 2011-09-01. Per seed:

1. pretrain a :class:`~recpeft.models.basket_ranker.BasketRanker` on every market's purchases
   before the split (early stopping on the latest 10% of them);
2. for each of MARKETS, on that market's purchases before the split (its latest 20%, by day, held
   out for early stopping): (a) a LoRA adapter (``get_peft_model`` + ``LoraAdamW``) on
   the customer and market tables and on both MLPs, (b) dense fine-tuning of every
   parameter (AdamW);
3. evaluate base, LoRA and dense on the market's purchases after the split:
   AUC of each purchase against 4 products the customer never bought (uniform, the same draw for
   the three models), and HR@10 / NDCG@10 of the purchased product ranked among all products
   (the basket's other items, already in the cart, are not candidates; "_all" keys rank among
   every product).

Mean of ``--seeds`` seeds. Writes ``benchmarks/results/quality_online_retail.json`` and ``.png``.

    python benchmarks/quality_online_retail.py [--data ../shared/data/online_retail.parquet] [--seeds 3]

Data: Chen, D. (2015). Online Retail. UCI Machine Learning Repository, doi:10.24432/C5BW33, CC BY 4.0.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from tqdm import tqdm

from recpeft import LoraAdamW, LoraConfig, get_peft_model
from recpeft.datasets.online_retail import (NUM_CONTEXT, NUM_CROSS, RetailCatalog, RetailEvents,
                                            load_online_retail, purchases)
from recpeft.io import atomic_path, atomic_write_text
from recpeft.metrics import auc, ranking_metrics
from recpeft.models.basket_ranker import BasketRanker

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "online_retail.parquet"
RESULTS = ROOT / "benchmarks" / "results"
SPLIT = pd.Timestamp("2011-09-01")
MARKETS = ("Germany", "France", "Spain", "Belgium", "Switzerland", "Portugal")
NEGATIVES = 4
K = 10
MASKED = -1e9                       # logit of the basket's other items in the training softmax
TARGETS = {"base_auc": 0.757, "lora_auc": 0.770, "lora_ndcg@10": 0.047, "adapter_share": 0.01}
REFERENCE = {"base": {"auc": 0.757, "ndcg@10": 0.0425}, "lora": {"auc": 0.764, "ndcg@10": 0.0450},
             "dense": {"auc": 0.760, "ndcg@10": 0.0445}}
# The basket/history bags are left out: their touched rows (1–2k items per market) would take the
# adapter file past 1% of the base checkpoint for no gain on the validation slices.
LORA_TARGETS = ["customers", "markets", "context_mlp.0", "context_mlp.3", "item_mlp.0", "item_mlp.3"]


@dataclass
class Settings:
    """Hyper-parameters (chosen on the validation slices, never on the test rows)."""

    dim: int = 64
    hidden: int = 128
    dropout: float = 0.1
    batch_size: int = 512
    base_lr: float = 2e-3
    base_epochs: int = 6
    base_weight_decay: float = 1e-4
    lora_r: int = 4
    lora_alpha: float = 8.0
    lora_lr: float = 3e-3
    dense_lr: float = 3e-4
    tune_epochs: int = 20
    tune_batch_size: int = 256
    patience: int = 3
    base_valid_fraction: float = 0.1
    valid_fraction: float = 0.2


# ---------------------------------------------------------------------------------------------
# data


@dataclass
class Split:
    train: RetailEvents
    valid: RetailEvents
    test: RetailEvents | None = None
    test_negatives: torch.Tensor | None = None
    test_customers: np.ndarray | None = None


def valid_mask(rows: pd.DataFrame, select: np.ndarray, fraction: float) -> np.ndarray:
    """The latest rows of ``select``, about ``fraction`` of them, cut at a day boundary (so no
    basket is split): the early-stopping slice."""
    days = rows["Day"].to_numpy()
    cut = np.quantile(days[select].astype("int64"), 1.0 - fraction).astype("datetime64[ns]")
    return select & (days >= cut)


def sample_negatives(rows: pd.DataFrame, test: RetailEvents, customers: np.ndarray, num_items: int,
                     item_of: dict, rng: np.random.Generator) -> torch.Tensor:
    """[N, NEGATIVES] products each test row's customer never bought (uniform, without repeats)."""
    bought: dict[int, set] = {}
    for c, p in zip(rows["CustomerID"].to_numpy(), rows["Description"].map(item_of).to_numpy()):
        bought.setdefault(int(c), set()).add(int(p))
    out = np.empty((len(test), NEGATIVES), dtype=np.int64)
    for n, c in enumerate(customers):
        chosen: list[int] = []
        while len(chosen) < NEGATIVES:
            j = int(rng.integers(num_items))
            if j not in bought[int(c)] and j not in chosen:
                chosen.append(j)
        out[n] = chosen
    return torch.from_numpy(out)


def prepare(path: Path, settings: Settings, progress: bool):
    rows = purchases(load_online_retail(path))
    before = (rows["InvoiceDate"] < SPLIT).to_numpy()
    catalog = RetailCatalog.build(rows, before)
    late = valid_mask(rows, before, settings.base_valid_fraction)
    events = RetailEvents(rows, catalog)
    base = Split(events.select(before & ~late), events.select(late))
    markets = {}
    for market in MARKETS:
        own = (rows["Country"] == market).to_numpy()
        if not own.any():
            raise ValueError(f"{path}: column 'Country' has no rows for market {market!r}")
        market_late = valid_mask(rows, own & before, settings.valid_fraction)
        test_select = own & ~before
        markets[market] = Split(events.select(own & before & ~market_late), events.select(market_late),
                                events.select(test_select), test_customers=rows["CustomerID"].to_numpy()[test_select])
    return rows, catalog, base, markets


# ---------------------------------------------------------------------------------------------
# training and evaluation


def batch_loss(model, events: RetailEvents, index: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the purchased item over all items, the basket's others masked."""
    batch = events.batch(index)
    logits = model(*batch.args).masked_fill(events.basket_mask(index), MASKED)
    return F.cross_entropy(logits, batch.labels)


@torch.no_grad()
def scores_of(model, events: RetailEvents, batch_size: int = 1024) -> torch.Tensor:
    """[N, I] logits of every row."""
    model.eval()
    parts = [model(*events.batch(torch.arange(s, min(s + batch_size, len(events)))).args)
             for s in range(0, len(events), batch_size)]
    return torch.cat(parts)


def valid_loss(model, events: RetailEvents, batch_size: int = 1024) -> float:
    """Mean masked cross-entropy over the validation rows (the early-stopping criterion)."""
    model.eval()
    with torch.no_grad():
        total = sum(float(batch_loss(model, events, idx)) * len(idx)
                    for idx in torch.arange(len(events)).split(batch_size))
    return total / len(events)


def train(model, optimizer, split: Split, epochs: int, batch_size: int, patience: int, seed: int,
          desc: str, progress: bool) -> dict:
    """Mini-batch training with early stopping on the validation loss; the best epoch's trainable
    weights are restored. Returns {"epochs", "best_epoch", "valid_loss", "seconds"}."""
    generator = torch.Generator().manual_seed(seed)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    best, best_epoch, best_state = valid_loss(model, split.valid), 0, {n: p.detach().clone() for n, p in trainable.items()}
    start, epoch = time.perf_counter(), 0
    bar = tqdm(range(1, epochs + 1), desc=desc, disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        for index in torch.randperm(len(split.train), generator=generator).split(batch_size):
            loss = batch_loss(model, split.train, index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        current = valid_loss(model, split.valid)
        bar.set_postfix(valid=f"{current:.4f}", best=f"{best:.4f}")
        if current < best:
            best, best_epoch = current, epoch
            best_state = {n: p.detach().clone() for n, p in trainable.items()}
        elif epoch - best_epoch >= patience:
            break
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(best_state[name])
    return {"epochs": epoch, "best_epoch": best_epoch, "valid_loss": best, "seconds": time.perf_counter() - start}


def evaluate(model, split: Split) -> dict:
    """AUC against the sampled negatives, HR@K / NDCG@K among all items (cart excluded, and not)."""
    scores = scores_of(model, split.test)
    targets = split.test.labels
    rows = torch.arange(len(targets))
    positive, negative = scores[rows, targets], scores[rows.unsqueeze(1), split.test_negatives]
    labels = torch.cat([torch.ones(len(targets)), torch.zeros(negative.numel())])
    out = {"auc": auc(torch.cat([positive, negative.flatten()]), labels)}
    out.update(ranking_metrics(scores, targets, K, exclude=split.test.basket_mask(rows)))
    out.update({f"{k}_all": v for k, v in ranking_metrics(scores, targets, K).items()})
    return out


def file_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())


def run_seed(seed: int, settings: Settings, catalog: RetailCatalog, base_split: Split, markets: dict,
             rows: pd.DataFrame, workdir: Path, progress: bool) -> dict:
    torch.manual_seed(seed)
    item_of = {p: i for i, p in enumerate(catalog.products)}
    rng = np.random.default_rng(seed)
    for split in markets.values():
        split.test_negatives = sample_negatives(rows, split.test, split.test_customers, catalog.num_items, item_of, rng)
    base = BasketRanker(len(catalog.customers) + 1, len(catalog.markets), len(catalog.words), catalog.word_ids,
                        catalog.word_offsets, catalog.item_dense, num_context=NUM_CONTEXT, num_cross=NUM_CROSS,
                        dim=settings.dim, hidden=settings.hidden, dropout=settings.dropout)
    optimizer = torch.optim.AdamW(base.parameters(), lr=settings.base_lr, weight_decay=settings.base_weight_decay)
    base_fit = train(base, optimizer, base_split, settings.base_epochs, settings.batch_size, 1, seed,
                     f"seed {seed} base", progress)
    checkpoint = workdir / f"base_{seed}.pt"
    with atomic_path(checkpoint) as tmp:
        torch.save(base.state_dict(), tmp)
    base_bytes = checkpoint.stat().st_size
    result = {"base_fit": base_fit, "base_checkpoint_bytes": base_bytes, "markets": {}}
    for market in tqdm(MARKETS, desc=f"seed {seed} markets", disable=not progress, leave=False):
        split = markets[market]
        entry = {"base": evaluate(base, split), "train_rows": len(split.train), "valid_rows": len(split.valid),
                 "test_rows": len(split.test)}

        lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha,
                                                              target_modules=LORA_TARGETS))
        optimizer = LoraAdamW([p for p in lora.parameters() if p.requires_grad], lr=settings.lora_lr)
        entry["lora_fit"] = train(lora, optimizer, split, settings.tune_epochs, settings.tune_batch_size,
                                  settings.patience, seed, f"{market} lora", progress)
        entry["lora"] = evaluate(lora, split)
        adapter_dir = workdir / f"{market}_{seed}"
        lora.save_pretrained(adapter_dir)
        entry["adapter_bytes"] = file_bytes(adapter_dir)
        entry["adapter_share"] = entry["adapter_bytes"] / base_bytes
        entry["lora_params"] = lora.get_nb_trainable_parameters()

        dense = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(dense.parameters(), lr=settings.dense_lr, weight_decay=settings.base_weight_decay)
        entry["dense_fit"] = train(dense, optimizer, split, settings.tune_epochs, settings.tune_batch_size,
                                   settings.patience, seed, f"{market} dense", progress)
        entry["dense"] = evaluate(dense, split)
        result["markets"][market] = entry
    return result


# ---------------------------------------------------------------------------------------------
# report


def summarize(per_seed: dict[int, dict]) -> dict:
    """Per market and overall means over seeds, and the targets met or missed."""
    seeds = list(per_seed)
    metrics = ("auc", "hr@10", "ndcg@10", "hr@10_all", "ndcg@10_all")
    markets = {}
    for market in MARKETS:
        entries = [per_seed[s]["markets"][market] for s in seeds]
        markets[market] = {model: {m: float(np.mean([e[model][m] for e in entries])) for m in metrics}
                           for model in ("base", "lora", "dense")}
        markets[market]["adapter_share"] = float(np.max([e["adapter_share"] for e in entries]))
        markets[market]["adapter_bytes"] = int(np.max([e["adapter_bytes"] for e in entries]))
    mean = {model: {m: float(np.mean([markets[k][model][m] for k in MARKETS])) for m in metrics}
            for model in ("base", "lora", "dense")}
    checks = {
        "base_auc >= 0.757": mean["base"]["auc"] >= TARGETS["base_auc"],
        "lora_auc >= 0.770": mean["lora"]["auc"] >= TARGETS["lora_auc"],
        "lora_ndcg@10 >= 0.047": mean["lora"]["ndcg@10"] >= TARGETS["lora_ndcg@10"],
        "lora_auc >= base_auc in every market": all(markets[k]["lora"]["auc"] >= markets[k]["base"]["auc"] for k in MARKETS),
        "lora_auc >= dense_auc (mean)": mean["lora"]["auc"] >= mean["dense"]["auc"],
        "adapter <= 1% of base checkpoint": all(markets[k]["adapter_share"] <= TARGETS["adapter_share"] for k in MARKETS),
    }
    return {"markets": markets, "mean": mean, "targets": checks}


def table(summary: dict) -> str:
    lines = [f"{'market':<12} {'base AUC':>9} {'LoRA AUC':>9} {'dense AUC':>9}   {'base N@10':>9} {'LoRA N@10':>9} "
             f"{'dense N@10':>10}  {'adapter':>8}"]
    rows = [(k, summary["markets"][k]) for k in MARKETS] + [("mean", summary["mean"])]
    for name, m in rows:
        share = f"{100 * m['adapter_share']:.2f}%" if "adapter_share" in m else ""
        lines.append(f"{name:<12} {m['base']['auc']:9.4f} {m['lora']['auc']:9.4f} {m['dense']['auc']:9.4f}   "
                     f"{m['base']['ndcg@10']:9.4f} {m['lora']['ndcg@10']:9.4f} {m['dense']['ndcg@10']:10.4f}  {share:>8}")
    lines += [f"{'met' if ok else 'MISSED':>6}  {name}" for name, ok in summary["targets"].items()]
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(MARKETS) + ["mean"]
    source = [summary["markets"][k] for k in MARKETS] + [summary["mean"]]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2))
    for ax, metric, title in zip(axes, ("auc", "ndcg@10"), ("AUC vs 4 sampled non-purchases", "NDCG@10 among all products")):
        x = np.arange(len(names))
        for offset, model in zip((-0.27, 0.0, 0.27), ("base", "lora", "dense")):
            ax.bar(x + offset, [m[model][metric] for m in source], width=0.27, label=model)
        ref = REFERENCE
        ax.axhline(ref["lora"][metric], color="gray", linestyle="--", linewidth=0.8, label="reference LoRA (mean)")
        ax.set_xticks(x, names, rotation=20)
        ax.set_title(title)
        low = min(m[model][metric] for m in source for model in ("base", "lora", "dense"))
        ax.set_ylim(bottom=max(0.0, low - 0.05) if metric == "auc" else 0.0)
    axes[0].legend(fontsize=8)
    fig.suptitle("UCI Online Retail: per-country LoRA vs dense fine-tuning (time split 2011-09-01)")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress
    settings = Settings()
    start = time.perf_counter()
    rows, catalog, base_split, markets = prepare(args.data, settings, progress)
    per_seed = {}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in range(args.seeds):
            per_seed[seed] = run_seed(seed, settings, catalog, base_split, markets, rows, Path(workdir), progress)
    summary = summarize(per_seed)
    report = {
        "benchmark": "quality_online_retail", "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": {"file": args.data.name, "purchases": len(rows), "products": catalog.num_items,
                 "customers_before_split": len(catalog.customers), "split": str(SPLIT.date()),
                 "source": "Chen, D. (2015). Online Retail. UCI ML Repository, doi:10.24432/C5BW33, CC BY 4.0"},
        "settings": asdict(settings), "lora_targets": LORA_TARGETS, "seeds": args.seeds,
        "torch": torch.__version__, "threads": args.threads, "machine": platform.machine(),
        "seconds": time.perf_counter() - start, "reference": REFERENCE, "targets": TARGETS,
        **summary, "per_seed": per_seed,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output / "quality_online_retail.json", json.dumps(report, indent=1) + "\n")
    plot(summary, args.output / "quality_online_retail.png")
    print(table(summary))
    print(f"{report['seconds']:.0f} s; wrote {args.output / 'quality_online_retail.json'} and .png")
    return report


if __name__ == "__main__":
    main()
