"""Per-market LoRA for next-item ranking: SASRec on the embedded shop's clicks, end to end.

    python examples/personalize_ranking.py --out runs/ranking          # about 1-2 minutes on 2 cores
    python examples/personalize_ranking.py --quick --out /tmp/ranking  # seconds: tiny dims, 2 epochs

Protocol (DESIGN.md, "Quality protocol", ranking):

1. Sequences. Each user's clicks (label == 1) in time order (ties by row order) form the
   sequence x_1..x_n of item ids (shop item i becomes id i + 1; 0 is SASRec's padding).
2. Split, leave-last-out per user (``recpeft.datasets.splits.leave_last_out``, users with ≥ 3
   clicks): x_n is the test target, x_{n−1} the validation target, x_1..x_{n−2} the training
   part. Users with fewer clicks only train.
3. Training rows. A training part of m items gives inputs x_1..x_{m−1} and next-item targets
   x_2..x_m, cut from the end into windows of at most L = ``--max-len`` positions, left-padded.
   Loss: SASRec's full-softmax cross-entropy over all items at every non-padding position.
4. Evaluation. Validation input: the last L items of the training part, target x_{n−1}. Test
   input: the last L items of x_1..x_{n−1}, target x_n. The target is ranked by
   s_i = h_L · E_i among **every catalogue item** (ids 1..N−1; the user's earlier items stay
   candidates, since shoppers re-click items), ties counted pessimistically:
   rank = #{j ≠ target : s_j ≥ s_target}; HR@10 = mean [rank < 10], NDCG@10 =
   mean [rank < 10] / log2(rank + 2). Beside it, labelled "sampled": the target against 100
   items drawn uniformly without replacement from the catalogue minus the target (one fixed
   draw per user, shared by every model).
5. Pretrain SASRec on every market's training rows (early stopping on all users' validation
   NDCG@10). Then for each market except the largest, starting from the same base and seed:
   (a) LoRA r = 4 on ``SASRec.lora_targets()`` (attention and FFN linears), (b) dense
   fine-tuning of every parameter, both on that market's users' training rows, early-stopped on
   that market's validation NDCG@10 (the base competes as epoch −1, so a fine-tune that never
   beats it on validation returns the base). Report base / LoRA / dense on the market's test
   targets.

Outputs in ``--out``: ``ranking_report.json`` (written atomically), ``base_model.pt`` (the
pretrained weights and ``spec``), ``adapters/<market>/`` (each market's LoRA adapter, HF PEFT
file names). ``main(argv)`` returns the :class:`Experiment` (models, data, report) for tests.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from recpeft import LoraConfig, PeftModel
from recpeft.apps.demo_report import save_report
from recpeft.apps.workflow import Method, trainable_copy
from recpeft.datasets.batch import Batch, TensorBatches
from recpeft.datasets.splits import leave_last_out
from recpeft.datasets.synthetic import load_shop
from recpeft.metrics import ranking_metrics, sampled_ranking_metrics
from recpeft.models.sasrec import PAD, SASRec
from recpeft.train import TrainConfig, Trainer
from recpeft.utils.atomic import atomic_path

K = 10  # the cut-off of HR@K and NDCG@K
SAMPLED_NEGATIVES = 100
VARIANTS = ("base", "lora", "dense")


# ---- data ----------------------------------------------------------------------------------------


@dataclass
class EvalSet:
    """Users evaluated on one target each: inputs [U, L] (left-padded ids), targets [U] (ids
    1..N−1), negatives [U, 100] (sampled ids, never the target), market [U] (names)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    negatives: torch.Tensor
    market: np.ndarray

    def rows(self, market: str | None = None) -> EvalSet:
        keep = np.ones(len(self.market), bool) if market is None else self.market == market
        index = torch.from_numpy(np.flatnonzero(keep))
        return EvalSet(self.inputs[index], self.targets[index], self.negatives[index], self.market[keep])

    def source(self) -> TensorBatches:
        """For the Trainer's ``metric_fn``: args (inputs,), labels targets."""
        return TensorBatches(self.inputs, labels=self.targets)


@dataclass
class SequenceData:
    """Everything the experiment trains and evaluates on.

    ``train_inputs`` / ``train_targets`` [R, L]: next-item windows (0 = padding / no target);
    ``train_market`` [R]: each window's user's market. ``valid`` / ``test``: :class:`EvalSet`.
    ``num_items`` N counts the padding id (catalogue ids 1..N−1). ``markets``: largest first."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    train_market: np.ndarray
    valid: EvalSet
    test: EvalSet
    num_items: int
    max_len: int
    markets: list[str]
    counts: dict = field(default_factory=dict)

    def train_source(self, market: str | None = None) -> TensorBatches:
        keep = np.ones(len(self.train_market), bool) if market is None else self.train_market == market
        index = torch.from_numpy(np.flatnonzero(keep))
        return TensorBatches(self.train_inputs[index], labels=self.train_targets[index])


def left_pad(ids: list[int], length: int) -> list[int]:
    """The last ``length`` of ``ids``, padded on the left with PAD to exactly ``length``."""
    ids = list(ids)[-length:]
    return [PAD] * (length - len(ids)) + ids


def next_item_windows(items: list[int], max_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) windows of one training sequence x_1..x_m: inputs x_t, targets x_{t+1},
    t = 1..m−1, cut from the end into windows of ≤ ``max_len`` positions, each left-padded."""
    inputs, targets = items[:-1], items[1:]
    windows = []
    for end in range(len(inputs), 0, -max_len):
        begin = max(0, end - max_len)
        windows.append((left_pad(inputs[begin:end], max_len), left_pad(targets[begin:end], max_len)))
    return windows


def sample_negatives(targets: torch.Tensor, num_items: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """[U, count] distinct ids from 1..N−1 other than each row's target, uniformly: a random
    permutation of the N−2 other ids, its first ``count`` taken (ids ≥ target shift up by one)."""
    if count > num_items - 2:
        raise ValueError(f"cannot draw {count} negatives from {num_items - 2} non-target items")
    draws = torch.rand(len(targets), num_items - 2, generator=generator).argsort(dim=1)[:, :count] + 1  # 1..N−2
    return draws + (draws >= targets.unsqueeze(1)).long()


def prepare_sequences(shop: pd.DataFrame, max_len: int, seed: int = 0) -> SequenceData:
    """Clicks → per-user sequences → leave-last-out split → windows and evaluation sets."""
    for column in ("user", "item", "timestamp", "market", "label"):
        if column not in shop.columns:
            raise ValueError(f"the shop table has no column {column!r}; it has {list(shop.columns)}")
    if max_len < 1:
        raise ValueError(f"--max-len must be ≥ 1, got {max_len}")
    clicks = shop[shop["label"] == 1].sort_values("timestamp", kind="stable")
    parts = leave_last_out(clicks, "user", "timestamp", min_interactions=3)
    market_of = clicks.groupby("user", observed=True)["market"].first().astype(str)
    # train rows in time order; groupby keeps each group's row order
    train_items = parts.train.groupby("user")["item"].apply(lambda s: [int(i) + 1 for i in s]).to_dict()
    num_items = int(shop["item"].max()) + 2
    windows, window_market = [], []
    for user, items in train_items.items():
        for window in next_item_windows(items, max_len):
            windows.append(window)
            window_market.append(market_of[user])
    generator = torch.Generator().manual_seed(seed)

    def eval_set(target_rows: pd.DataFrame, history: dict[int, list[int]]) -> EvalSet:
        users = target_rows["user"].to_numpy()
        targets = torch.tensor(target_rows["item"].to_numpy(np.int64) + 1)
        inputs = torch.tensor([left_pad(history[u], max_len) for u in users], dtype=torch.long)
        negatives = sample_negatives(targets, num_items, SAMPLED_NEGATIVES, generator)
        return EvalSet(inputs, targets, negatives, market_of.loc[users].to_numpy())

    valid = eval_set(parts.valid, train_items)
    valid_item = dict(zip(parts.valid["user"], parts.valid["item"].to_numpy(np.int64) + 1))
    test = eval_set(parts.test, {u: train_items[u] + [valid_item[u]] for u in parts.test["user"]})
    markets = clicks["market"].astype(str).value_counts().index.tolist()  # largest first
    counts = {
        m: {
            "click_users": int((market_of == m).sum()),
            "test_users": int((test.market == m).sum()),
            "train_windows": int(sum(w == m for w in window_market)),
        }
        for m in markets
    }
    return SequenceData(
        torch.tensor([w[0] for w in windows]),
        torch.tensor([w[1] for w in windows]),
        np.array(window_market),
        valid,
        test,
        num_items,
        max_len,
        markets,
        counts,
    )


# ---- training and evaluation ---------------------------------------------------------------------


def next_item_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """The Trainer's ``loss_fn``: SASRec's full-softmax next-item cross-entropy, inputs
    ``batch.args[0]`` [B, L], targets ``batch.labels`` [B, L] (0 ignored)."""
    return model.loss(batch.args[0], batch.labels)


@torch.no_grad()
def catalogue_scores(model: nn.Module, inputs: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Next-item scores of every catalogue item, [U, N−1]: column j is item id j + 1 (the padding
    column of ``score_all`` is dropped)."""
    model.eval()
    return torch.cat([model.score_all(inputs[b : b + batch_size])[:, 1:] for b in range(0, len(inputs), batch_size)])


def evaluate(model: nn.Module, rows: EvalSet) -> dict[str, float]:
    """Full-catalogue HR@10 / NDCG@10 and the sampled variants ("sampled_" keys) on ``rows``."""
    scores = catalogue_scores(model, rows.inputs)
    column = rows.targets - 1
    metrics = ranking_metrics(scores, column, ks=[K])
    positives = scores.gather(1, column.unsqueeze(1)).squeeze(1)
    metrics.update(sampled_ranking_metrics(positives, scores.gather(1, rows.negatives - 1), k=K))
    return metrics


def validation_ndcg(model: nn.Module, source: TensorBatches) -> float:
    """The Trainer's ``metric_fn``: full-catalogue NDCG@10 of the source's targets."""
    inputs, targets = source.features[0], source.labels
    return ranking_metrics(catalogue_scores(model, inputs), targets - 1, ks=[K])[f"ndcg@{K}"]


def popularity_metrics(data: SequenceData, rows: EvalSet) -> dict[str, float]:
    """The same metrics for a popularity ranking (s_i = count of item i among all training
    targets, every market), the yardstick a sequential model has to beat."""
    counts = torch.bincount(data.train_targets.flatten(), minlength=data.num_items)[1:].double()
    scores = counts.expand(len(rows.targets), -1)
    metrics = ranking_metrics(scores, rows.targets - 1, ks=[K])
    metrics.update(sampled_ranking_metrics(counts[rows.targets - 1], counts[rows.negatives - 1], k=K))
    return metrics


@torch.no_grad()
def routed_scores(base: SASRec, adapter_root: Path, markets: list[str], rows: EvalSet) -> torch.Tensor:
    """Catalogue scores [U, N−1] of ``rows`` from ONE model holding every market's saved adapter,
    each row routed to its market's adapter by ``adapter_ids`` (−1, the base, for other markets):
    h = model(inputs, adapter_ids=ids)[:, −1], s = h·Eᵀ (E is not adapted)."""
    model = PeftModel.from_pretrained(copy.deepcopy(base), adapter_root / markets[0], adapter_name=markets[0])
    for market in markets[1:]:
        model.load_adapter(adapter_root / market, adapter_name=market)
    position = {name: i for i, name in enumerate(model.adapter_names)}
    ids = torch.tensor([position.get(m, -1) for m in rows.market])
    model.eval()
    hidden = model(rows.inputs, adapter_ids=ids)[:, -1]
    return hidden @ base.item_table()[1:].t()


def train(model: nn.Module, data: SequenceData, market: str | None, config: TrainConfig):
    """Fit ``model`` on ``market``'s windows (every market when None), early-stopped on its
    validation NDCG@10; returns the Trainer's FitReport."""
    trainer = Trainer(model, config, loss_fn=next_item_loss, metric_fn=validation_ndcg)
    return trainer.fit(data.train_source(market), data.valid.rows(market).source(), resume=False)


# ---- the experiment --------------------------------------------------------------------------------


@dataclass
class Experiment:
    """What a run leaves behind: the data, the base, each market's LoRA / dense model, the report."""

    data: SequenceData
    base: SASRec
    lora: dict = field(default_factory=dict)
    dense: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Per-market LoRA vs dense fine-tuning of SASRec on the embedded "
        "shop's clicks; HR@10 / NDCG@10 over the full catalogue."
    )
    parser.add_argument("--out", default="runs/ranking", help="output folder (report JSON, base weights, adapters)")
    parser.add_argument("--quick", action="store_true", help="tiny model and 2 epochs each (for tests)")
    parser.add_argument(
        "--markets", nargs="*", default=None, help="markets to fine-tune (default: every market except the largest)"
    )
    parser.add_argument("--max-len", type=int, default=None, help="SASRec's sequence length L (default 20)")
    parser.add_argument("--dim", type=int, default=None, help="SASRec's dimension D (default 48)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bars")
    return parser.parse_args(argv)


def recipe(args: argparse.Namespace) -> dict:
    """Model size and the three training configs; ``--quick`` shrinks everything."""
    quick = args.quick
    model = {
        "max_len": args.max_len or (10 if quick else 20),
        "dim": args.dim or (16 if quick else 48),
        "num_blocks": 1 if quick else 2,
        "num_heads": 1,
        "dropout": 0.2,
    }
    common = {"batch_size": 128, "seed": args.seed, "progress": args.progress, "warmup_fraction": 0.0}
    pretrain = TrainConfig(epochs=2 if quick else 40, lr=2e-3, early_stopping_patience=3, desc="pretrain", **common)
    lora = TrainConfig(
        epochs=2 if quick else 20, lr=3e-3, early_stopping_patience=3, keep_initial=True, schedule="constant", **common
    )
    dense = dataclasses.replace(lora, lr=3e-4)
    return {"model": model, "pretrain": pretrain, "lora": lora, "dense": dense}


def fit_summary(report, model: nn.Module) -> dict:
    """A FitReport's best epoch (−1: the starting weights won), epochs, best validation NDCG@10,
    seconds, and the model's trainable parameter count."""
    return {
        "best_epoch": report.best_epoch,
        "epochs_run": report.epochs_run,
        "best_valid_ndcg@10": report.best_metric,
        "seconds": report.seconds,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


def run(args: argparse.Namespace) -> Experiment:
    """Prepare, pretrain, fine-tune per market, evaluate, check routing, write the outputs."""
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    settings = recipe(args)
    data = prepare_sequences(load_shop(), settings["model"]["max_len"], seed=args.seed)
    markets = args.markets if args.markets is not None else data.markets[1:]
    unknown = [m for m in markets if m not in data.markets]
    if unknown:
        raise ValueError(f"--markets: unknown market(s) {unknown}; the shop has {data.markets}")

    torch.manual_seed(args.seed)
    base = SASRec(data.num_items, **settings["model"])
    pretrain_report = train(base, data, None, settings["pretrain"])
    for parameter in base.parameters():
        parameter.requires_grad_(False)
    with atomic_path(out / "base_model.pt") as tmp:
        torch.save({"spec": base.spec, "state_dict": base.state_dict()}, tmp)
    experiment = Experiment(data, base)
    lora_config = LoraConfig(r=4, target_modules=base.lora_targets())
    rows = {}
    for market in tqdm(markets, desc="markets", disable=not args.progress):
        test = data.test.rows(market)
        row = {
            "test_users": len(test.targets),
            "base": {"metrics": evaluate(base, test)},
            "popularity": {"metrics": popularity_metrics(data, test)},
        }
        for method, name in ((Method.LORA, "lora"), (Method.DENSE, "dense")):
            torch.manual_seed(args.seed)  # the adapters' initialisation follows the seed
            model = trainable_copy(base, method, lora_config)
            config = dataclasses.replace(settings[name], desc=f"{name} {market}")
            report = train(model, data, market, config)
            row[name] = {"metrics": evaluate(model, test), "train": fit_summary(report, model)}
            getattr(experiment, name)[market] = model
        adapter_dir = out / "adapters" / market
        experiment.lora[market].save_pretrained(adapter_dir)
        row["lora"]["adapter_bytes"] = sum(f.stat().st_size for f in adapter_dir.iterdir())
        rows[market] = row

    routing_diff = None
    if markets:  # every test user in one batch, each routed to its market's adapter (others: the base)
        expected = torch.cat(
            [catalogue_scores(experiment.lora.get(m, base), data.test.rows(m).inputs) for m in data.markets]
        )
        order = np.concatenate([np.flatnonzero(data.test.market == m) for m in data.markets])
        routed = routed_scores(base, out / "adapters", markets, data.test.rows())[torch.from_numpy(order)]
        routing_diff = float((routed - expected).abs().max())
    experiment.report = {
        "protocol": {
            "data": "embedded synthetic shop (recpeft.datasets.synthetic.load_shop), clicks only",
            "split": "leave-last-out per user with >= 3 clicks: last click = test target, second last = validation",
            "candidates": "every catalogue item (the user's earlier items stay candidates); ties pessimistic",
            "sampled": f"'sampled_*' keys rank the target among {SAMPLED_NEGATIVES} uniform negatives "
            "(not the target), for comparison only",
            "k": K,
            "model": {"num_items": data.num_items, **settings["model"]},
            "lora": {"r": lora_config.r, "lora_alpha": lora_config.lora_alpha, "targets": "lora_targets"},
            "train": {n: settings[n].to_dict() for n in ("pretrain", "lora", "dense")},
        },
        "counts": data.counts,
        "pretrain": {
            **fit_summary(pretrain_report, base),
            "all_users_test": evaluate(base, data.test),
            "trainable_params": sum(p.numel() for p in base.parameters()),
        },
        "markets": rows,
        "mean": {
            v: {
                key: float(np.mean([rows[m][v]["metrics"][key] for m in rows]))
                for key in rows[markets[0]][v]["metrics"]
            }
            for v in (*VARIANTS, "popularity")
        }
        if rows
        else {},
        "routing_max_abs_diff": routing_diff,
        "seconds": time.perf_counter() - start,
    }
    save_report(out / "ranking_report.json", experiment.report)
    return experiment


def format_table(report: dict) -> str:
    """Two blocks, one line per market and the mean over markets: test users and HR@10 / NDCG@10
    of base / LoRA / dense over the full catalogue, then the same ranked among 100 sampled items."""
    named = [(m, str(r["test_users"]), {v: r[v]["metrics"] for v in VARIANTS}) for m, r in report["markets"].items()]
    if report["mean"]:
        named.append(("mean", "", report["mean"]))
    text = []
    for title, keys in (
        ("full catalogue", [f"hr@{K}", f"ndcg@{K}"]),
        (f"sampled ({SAMPLED_NEGATIVES} negatives)", [f"sampled_hr@{K}", f"sampled_ndcg@{K}"]),
    ):
        header = ["market", "users"] + [f"{v} {k}" for k in keys for v in VARIANTS]
        lines = [
            [name, users] + [f"{metrics[v][k]:.4f}" for k in keys for v in VARIANTS] for name, users, metrics in named
        ]
        widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
        text.append(f"{title}:")
        text += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in [header, *lines]]
    text.append(
        f"full: the test target ranked among all {report['protocol']['model']['num_items'] - 1} items "
        f"(earlier items stay candidates); sampled: among {SAMPLED_NEGATIVES} random items, not comparable."
    )
    return "\n".join(text)


def main(argv: list[str] | None = None) -> Experiment:
    args = parse_args(argv)
    experiment = run(args)
    print(format_table(experiment.report))
    report = experiment.report
    if report["mean"]:
        pop = report["mean"]["popularity"]
        print(
            f"popularity ranking (mean over markets): hr@{K} {pop[f'hr@{K}']:.4f}, ndcg@{K} {pop[f'ndcg@{K}']:.4f}; "
            f"routed mixed batch vs per-market models: max |diff| {report['routing_max_abs_diff']:.2e}"
        )
    print(
        f"base pretrained in {experiment.report['pretrain']['seconds']:.1f} s; "
        f"total {experiment.report['seconds']:.1f} s; report and adapters in {args.out}"
    )
    return experiment


if __name__ == "__main__":
    main(sys.argv[1:])
