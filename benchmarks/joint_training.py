"""Joint against separate fine-tuning of many segments' adapters: quality and wall time.

On the embedded shop (data/README.md, the demo's split and base recipe: test from 2026-03-12,
each market's latest 25% of earlier rows for validation), one base is pretrained; then every
market's LoRA adapter (the demo's config: r = 4 on the category, brand and price tables and every
MLP layer) is trained twice from it with the same settings (10 epochs, batch 512, lr 3e-3,
patience 2, the base as epoch −1):

- separate: one :func:`~recpeft.apps.workflow.finetune` run per market on its own rows;
- joint: one :func:`~recpeft.apps.joint.finetune_jointly` run over every market's rows mixed,
  each row routed to its market's adapter, with the same early stopping per market.

Reported per market: test AUC and LogLoss of the base, the separate and the joint adapter, each
one's kept epoch; and the wall time of all separate runs against the joint run (validation
included), measured one after the other in this process. Seeds ``--seeds``; every seed reported.

    python benchmarks/joint_training.py [--seeds 2] [--output benchmarks/results]

Writes ``joint_training.json`` and ``joint_training.png`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from recpeft.apps.demo import FINETUNE, PRETRAIN, TEST_START, VALID_FRACTION
from recpeft.apps.demo_report import save_figure
from recpeft.apps.joint import finetune_jointly
from recpeft.apps.shop_recipe import BASE_OPTIONS, LORA
from recpeft.apps.workflow import Method, click_metrics, finetune, prepare, pretrain
from recpeft.datasets.synthetic import SHOP_SCHEMA, load_shop
from recpeft.utils.atomic import atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"
SETTINGS = replace(FINETUNE, lr=3e-3, keep_initial=True, progress=False)


def run_seed(seed: int) -> dict:
    data = prepare(load_shop(), SHOP_SCHEMA, test_start=TEST_START, valid_fraction=VALID_FRACTION, name="shop")
    base, _ = pretrain(data, model_options=BASE_OPTIONS, train_config=replace(PRETRAIN, seed=seed, progress=False))
    segments = list(data.segments)
    config = replace(SETTINGS, seed=seed)
    rows = {s: {"base": click_metrics(base, data.segment_rows("test", s))} for s in segments}
    start = time.perf_counter()
    for segment in segments:
        model, report = finetune(base, data, segment, Method.LORA, train_config=config, lora_config=LORA)
        rows[segment]["separate"] = click_metrics(model, data.segment_rows("test", segment))
        rows[segment]["separate_best_epoch"] = report.best_epoch
    separate_s = time.perf_counter() - start
    start = time.perf_counter()
    model, result = finetune_jointly(base, data, segments, lora_config=LORA, train_config=config)
    joint_s = time.perf_counter() - start
    for segment in segments:
        model.set_adapter(segment)
        rows[segment]["joint"] = click_metrics(model, data.segment_rows("test", segment))
        rows[segment]["joint_best_epoch"] = result["best_epoch"][segment]
    return {
        "segments": rows,
        "separate_seconds": separate_s,
        "joint_seconds": joint_s,
        "joint_epochs": result["report"].epochs_run,
    }


def table(per_seed: dict) -> str:
    lines = [f"{'seed':<5}{'market':<8}{'base AUC':>9}{'separate':>9}{'joint':>9}{'sep LL':>8}{'joint LL':>9}"]
    for seed, run in per_seed.items():
        for segment, r in run["segments"].items():
            lines.append(
                f"{seed:<5}{segment:<8}{r['base']['auc']:>9.4f}{r['separate']['auc']:>9.4f}{r['joint']['auc']:>9.4f}"
                f"{r['separate']['log_loss']:>8.4f}{r['joint']['log_loss']:>9.4f}"
            )
        lines.append(
            f"{seed:<5}wall time: separate {run['separate_seconds']:.1f} s, joint {run['joint_seconds']:.1f} s "
            f"(joint / separate {run['joint_seconds'] / run['separate_seconds']:.2f})"
        )
    return "\n".join(lines)


def plot(per_seed: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    first = next(iter(per_seed.values()))["segments"]
    names = list(first)
    x = np.arange(len(names))
    for offset, arm in zip((-0.27, 0.0, 0.27), ("base", "separate", "joint")):
        means = [np.mean([run["segments"][s][arm]["auc"] for run in per_seed.values()]) for s in names]
        left.bar(x + offset, means, width=0.27, label=arm)
    left.set_xticks(x, names)
    left.set_ylim(bottom=min(first[s]["base"]["auc"] for s in names) - 0.03)
    left.set_title("test AUC per market (mean over seeds)")
    left.legend(fontsize=8)
    seeds = list(per_seed)
    right.bar(np.arange(len(seeds)) - 0.2, [per_seed[s]["separate_seconds"] for s in seeds], 0.4, label="separate")
    right.bar(np.arange(len(seeds)) + 0.2, [per_seed[s]["joint_seconds"] for s in seeds], 0.4, label="joint")
    right.set_xticks(np.arange(len(seeds)), [f"seed {s}" for s in seeds])
    right.set_title("wall time of all markets' fine-tuning (s)")
    right.legend(fontsize=8)
    fig.suptitle("Embedded shop: every market's LoRA adapter, separate runs vs one joint run")
    save_figure(fig, path)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    per_seed = {seed: run_seed(seed) for seed in range(args.seeds)}
    report = {
        "benchmark": "joint_training",
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": "embedded shop (data/README.md), the demo's split",
        "lora_config": LORA.to_dict(),
        "train_config": SETTINGS.to_dict(),
        "torch": torch.__version__,
        "threads": args.threads,
        "machine": platform.machine(),
        "seconds": time.perf_counter() - start,
        "per_seed": per_seed,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.output / "joint_training.json", json.dumps(report, indent=1) + "\n")
    plot(per_seed, args.output / "joint_training.png")
    print(table(per_seed))
    print(f"{report['seconds']:.0f} s; wrote {args.output / 'joint_training.json'}")
    return report


if __name__ == "__main__":
    main()
