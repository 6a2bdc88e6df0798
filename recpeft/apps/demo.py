"""``recpeft demo``, the main job: personalise a pretrained click model per market on the embedded
synthetic shop (data/README.md), LoRA against dense fine-tuning, with a report.

1. Split every market by time (test from 2026-03-12; the latest 25% of each market's rows before
   that are its validation rows) and pretrain a torchrec DLRM on every market's rows; the base is saved under
   ``<out>/base`` and reused by the next run unless ``fresh`` (the command refuses an ``--out`` that
   holds anything, a previous run too, unless ``--overwrite``).
2. For each market but the base's own (the largest), train on the market's rows before the cut
   (a) a LoRA adapter (r=4 on the category, brand and price tables and on every MLP layer) and
   (b) dense fine-tuning of every parameter with AdamW; each method tries the same learning rates
   and keeps the run with the best validation AUC, early-stopped on the market's validation rows;
   score base, LoRA and dense on the market's rows after the cut.
3. Save every adapter under ``<out>/adapters/<market>``, load the base with all of them and score
   a mixed batch routed by market in one pass; it must equal each market's merged model.
4. Print a table, write ``<out>/report.json`` and ``<out>/report.png``; check the targets.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from recpeft.datasets.synthetic import SHOP_SCHEMA, load_shop
from recpeft.metrics import weighted_auc
from recpeft.peft.model import PeftModel
from recpeft.train.trainer import TrainConfig, predict
from recpeft.utils.devices import AUTO, describe_device, resolve_device

from .base_checkpoint import checkpoint_bytes, load_base, read_base_config, save_base
from .demo_report import print_table, save_plot, save_report
from .shop_recipe import BASE_OPTIONS, LORA
from .workflow import EncodedSplit, Method, click_metrics, finetune, prepare, pretrain

TEST_START = "2026-03-12"
VALID_FRACTION = 0.25  # of each market's rows before the cut: early stopping and the learning rate
PRETRAIN = TrainConfig(epochs=6, batch_size=1024, lr=1e-3, early_stopping_patience=1, desc="pretrain")
FINETUNE = TrainConfig(epochs=10, batch_size=512)
#: learning rates tried per method; the one with the best validation AUC is kept (never the test rows)
LEARNING_RATES = {Method.LORA: (1e-3, 3e-3, 1e-2), Method.DENSE: (1e-3, 3e-3, 1e-2)}
ROUTING_TOLERANCE = 1e-4
TARGETS = {"lora_minus_dense_auc_min": -0.002, "lift_over_base_auc_min": 0.01, "adapter_share_max": 0.02}


def _base_recipe(seed: int) -> dict:
    """What decides the base besides the data: a cached base is reused only if this matches."""
    recipe = {
        "seed": seed,
        "options": BASE_OPTIONS,
        "pretrain": PRETRAIN.to_dict(),
        "test_start": TEST_START,
        "valid_fraction": VALID_FRACTION,
    }
    return json.loads(json.dumps(recipe))


def _base(data: EncodedSplit, out: Path, seed: int, progress: bool, fresh: bool, device):
    """The cached base under ``out/base`` if it fits the data, else a newly pretrained one."""
    cached = out / "base"
    if not fresh and cached.is_dir():
        model, encoder = load_base(cached)
        made_with = read_base_config(cached)["metrics"].get("made_with")
        if encoder.to_json() == data.encoder.to_json() and made_with == _base_recipe(seed):
            print(f"base: reusing {cached} (delete it or pass --fresh to pretrain again)")
            return model, {"reused": True}
        print(f"base: {cached} was made from other data or settings; pretraining again")
    config = replace(PRETRAIN, seed=seed, progress=progress)
    model, report = pretrain(data, model_options=BASE_OPTIONS, train_config=config, device=device)
    metrics = click_metrics(model, data.segment_rows("valid"))
    save_base(cached, model, data.encoder, metrics={"valid_auc": metrics["auc"], "made_with": _base_recipe(seed)})
    print(
        f"base: pretrained on every market ({report.samples:,} samples, {report.epochs_run} epochs, best "
        f"validation AUC {report.best_metric:.4f} at epoch {report.best_epoch}, {report.seconds:.1f} s)"
    )
    return model, {
        "reused": False,
        "epochs": report.epochs_run,
        "best_epoch": report.best_epoch,
        "valid_auc": report.best_metric,
        "seconds": report.seconds,
        "samples_per_second": report.samples_per_second,
    }


def _finetune_best_lr(base, data: EncodedSplit, market: str, method: Method, seed: int, progress: bool, device):
    """Fine-tune with every learning rate of ``LEARNING_RATES[method]``; keep the run with the best
    validation AUC. The report's time and throughput are that run's own; ``sweep_seconds`` counts
    every learning rate tried."""
    best, sweep_seconds = None, 0.0
    for lr in LEARNING_RATES[method]:
        config = replace(FINETUNE, lr=lr, seed=seed, progress=progress)
        model, report = finetune(base, data, market, method, train_config=config, lora_config=LORA, device=device)
        sweep_seconds += report.seconds
        if best is None or report.best_metric > best[1].best_metric:
            best = (model, report, lr)
    return (*best, sweep_seconds)


def _run_row(model, report, test, method: Method) -> dict:
    counts = model.get_nb_trainable_parameters() if isinstance(model, PeftModel) else None
    trainable = counts["trainable"] if counts else sum(p.numel() for p in model.parameters())
    return {
        **{f"{method.value}_{k}": v for k, v in click_metrics(model, test).items() if k in ("auc", "log_loss")},
        f"{method.value}_trainable_params": trainable,
        f"{method.value}_epochs": report.epochs_run,
        f"{method.value}_seconds": report.seconds,
        f"{method.value}_samples_per_second": report.samples_per_second,
        f"{method.value}_train_state_bytes": report.training_state_bytes,
        f"{method.value}_peak_memory_bytes": report.peak_memory_bytes,
    }


def _check_routing(out: Path, markets: list[str], data: EncodedSplit, seed: int) -> float:
    """Largest |routed − merged| over a mixed test batch of every market."""
    served, _ = load_base(out / "base")
    served = PeftModel.from_pretrained(served, out / "adapters" / markets[0], adapter_name=markets[0])
    for market in markets[1:]:
        served.load_adapter(out / "adapters" / market, adapter_name=market)
    test = data.segment_rows("test")
    names = data.encoder.segments  # the codes in encoded.segments index the encoder's list
    codes = torch.tensor([names.index(m) for m in markets])
    candidates = torch.nonzero(torch.isin(test.encoded.segments, codes)).squeeze(1)
    pick = candidates[torch.randperm(len(candidates), generator=torch.Generator().manual_seed(seed))[:4096]]
    mixed = test.subset(pick)
    adapter_ids = torch.tensor([markets.index(names[c]) for c in mixed.encoded.segments.tolist()])
    batch = mixed.batch(torch.arange(len(mixed)))
    served.eval()
    with torch.no_grad():
        routed = served(*batch.args, adapter_ids=adapter_ids)
    worst = 0.0
    for index, market in enumerate(markets):
        rows = torch.nonzero(adapter_ids == index).squeeze(1)
        single = copy.deepcopy(served)
        single.set_adapter(market)
        own = predict(single.merge_and_unload(), mixed.subset(rows))
        worst = max(worst, float((routed[rows] - own).abs().max()))
    return worst


def run_demo(
    out_dir: str | Path = "runs/demo",
    *,
    seed: int = 0,
    progress: bool = True,
    fresh: bool = False,
    markets: list[str] | None = None,
    device: str | torch.device | None = AUTO,
) -> dict:
    """Run the main job on ``device`` (:func:`recpeft.utils.devices.resolve_device`); write the
    base, the adapters, ``report.json`` and ``report.png`` to ``out_dir``."""
    started = time.perf_counter()
    device = resolve_device(device)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # fail at once, not after pretraining, when it cannot be made
    torch.manual_seed(seed)
    frame = load_shop()
    data = prepare(frame, SHOP_SCHEMA, test_start=TEST_START, valid_fraction=VALID_FRACTION, name="embedded shop")
    sizes = frame[SHOP_SCHEMA.segment].value_counts()
    markets = markets or [m for m in data.segments if m != sizes.idxmax()]
    unknown = sorted(set(markets) - set(data.segments))
    if unknown:
        raise ValueError(f"unknown market(s) {unknown}; the shop's markets are {data.segments}")
    print(
        f"data: {len(frame):,} impressions, {frame['user'].nunique():,} users, {frame['item'].nunique():,} items, "
        f"markets {data.segments}; test from {TEST_START}; personalising {markets}"
    )

    base, base_info = _base(data, out, seed, progress, fresh, device)
    base_bytes = checkpoint_bytes(out / "base")
    rows = []
    for market in markets:
        test = data.segment_rows("test", market)
        row = {
            "market": market,
            "train_rows": len(data.segment_rows("train", market)),
            "valid_rows": len(data.segment_rows("valid", market)),
            "test_rows": len(test),
        }
        row.update({f"base_{k}": v for k, v in click_metrics(base, test).items() if k in ("auc", "log_loss")})
        for method in (Method.LORA, Method.DENSE):
            model, report, lr, sweep_seconds = _finetune_best_lr(base, data, market, method, seed, progress, device)
            row.update(_run_row(model, report, test, method))
            row[f"{method.value}_lr"], row[f"{method.value}_sweep_seconds"] = lr, sweep_seconds
            if method is Method.LORA:
                model.save_pretrained(out / "adapters" / market)
                row["adapter_bytes"] = (out / "adapters" / market / "adapter_model.safetensors").stat().st_size
        row["adapter_share"] = row["adapter_bytes"] / base_bytes
        row["base_params"] = sum(p.numel() for p in base.parameters())
        rows.append(row)

    counts = {r["market"]: r["test_rows"] for r in rows}
    weighted = {m: weighted_auc({r["market"]: r[f"{m}_auc"] for r in rows}, counts) for m in ("base", "lora", "dense")}
    routing_diff = _check_routing(out, markets, data, seed)
    checks = _check_targets(rows, routing_diff)
    report = {
        "data": {
            "impressions": len(frame),
            "markets": data.segments,
            "test_start": TEST_START,
            "schema": SHOP_SCHEMA.to_dict(),
        },
        "base": {**base_info, "checkpoint_bytes": base_bytes, "options": BASE_OPTIONS},
        "lora_config": LORA.to_dict(),
        "finetune": {**FINETUNE.to_dict(), "learning_rates": {m.value: v for m, v in LEARNING_RATES.items()}},
        "markets": rows,
        "impression_weighted_auc": weighted,
        "routing_max_abs_diff": routing_diff,
        "targets": TARGETS,
        "checks": checks,
        "seed": seed,
        "device": describe_device(device),
        "seconds": time.perf_counter() - started,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    print_table(rows)
    print("impression-weighted AUC over these markets: " + ", ".join(f"{m} {v:.4f}" for m, v in weighted.items()))
    print(
        f"routed a mixed batch through {len(markets)} adapters in one pass; largest difference from each "
        f"market's merged model: {routing_diff:.2e}"
    )
    for name, passed in checks.items():
        print(f"target {name}: {'met' if passed else 'MISSED'}")
    save_report(out / "report.json", report)
    save_plot(out / "report.png", rows)
    print(
        f"wrote {out / 'report.json'}, {out / 'report.png'}, the base and {len(rows)} adapters under {out} "
        f"({report['seconds']:.0f} s)"
    )
    return report


def _check_targets(rows: list[dict], routing_diff: float) -> dict[str, bool]:
    return {
        "routed batch equals each market's merged model (≤ 1e-4)": routing_diff <= ROUTING_TOLERANCE,
        "LoRA AUC ≥ dense − 0.002 in every market": all(
            r["lora_auc"] - r["dense_auc"] >= TARGETS["lora_minus_dense_auc_min"] for r in rows
        ),
        "LoRA and dense AUC ≥ base + 0.01 in every market": all(
            min(r["lora_auc"], r["dense_auc"]) - r["base_auc"] >= TARGETS["lift_over_base_auc_min"] for r in rows
        ),
        "adapter file ≤ 2% of the base checkpoint": all(
            r["adapter_share"] <= TARGETS["adapter_share_max"] for r in rows
        ),
    }
