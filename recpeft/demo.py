"""The end-to-end example behind ``recpeft demo``: pretrain a click model on every market of the
embedded synthetic shop, train one LoRA adapter per small market, save, reload, route a mixed
batch through all adapters at once, merge, and print what happened."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from . import LoraConfig, PeftModel, get_peft_model
from .datasets.synthetic import make_shop
from .io import atomic_path, atomic_write_text
from .metrics import auc
from .models.click_model import ClickModel
from .train import fit, predict

# The item table and the MLP adapt per market; user rows belong to one market already.
TARGETS = ["items", "mlp.0", "mlp.2"]


def _tensors(frame):
    features = (torch.tensor(frame["user"].to_numpy()), torch.tensor(frame["item"].to_numpy()),
                torch.tensor(frame["market"].cat.codes.to_numpy().astype("int64")))
    return features, torch.tensor(frame["label"].to_numpy())


def run_demo(out_dir: str | Path = "runs/demo", seed: int = 0, progress: bool = True) -> dict:
    """Run the example; write adapters, the base checkpoint and ``summary.json`` to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)  # fail at once, not after pretraining, when it cannot be made
    torch.manual_seed(seed)
    shop = make_shop(seed=seed)
    markets = list(shop["market"].cat.categories)
    train, test = shop[shop["day"] < 80], shop[shop["day"] >= 80]
    print(f"data: {len(shop):,} impressions, {shop['user'].nunique():,} users, {shop['item'].nunique():,} items, "
          f"markets {markets}; train days < 80, test days ≥ 80")

    base = ClickModel(int(shop["user"].max()) + 1, int(shop["item"].max()) + 1, len(markets))
    report = fit(base, *_tensors(train), epochs=4, lr=5e-3, seed=seed, desc="pretrain", progress=progress)
    print(f"pretrained the base on all markets: {report.steps} steps, {report.samples_per_second:,.0f} samples/s")
    base_path = out / "base_model.pt"
    with atomic_path(base_path) as tmp:
        torch.save(base.state_dict(), tmp)

    rows = []
    for market in markets[1:]:
        market_train, market_test = (_tensors(f[f["market"] == market]) for f in (train, test))
        base_auc = auc(predict(base, market_test[0]), market_test[1])
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS))
        report = fit(model, *market_train, epochs=3, batch_size=256, lr=3e-3, seed=seed, desc=f"LoRA {market}",
                     progress=progress)
        lora_auc = auc(predict(model, market_test[0]), market_test[1])
        model.save_pretrained(out / "adapters" / market)
        counts = model.get_nb_trainable_parameters()
        rows.append({
            "market": market, "train_rows": int(market_train[1].numel()), "test_rows": int(market_test[1].numel()),
            "base_auc": base_auc, "lora_auc": lora_auc, "trainable_params": counts["trainable"],
            "touched_params": counts["touched"],
            "adapter_kb": (out / "adapters" / market / "adapter_model.safetensors").stat().st_size / 1024,
            "train_seconds": report.seconds,
        })
    base_kb = base_path.stat().st_size / 1024

    # Reload every adapter onto one fresh base and score a mixed batch routed by market.
    served = ClickModel(*(base.users.num_embeddings, base.items.num_embeddings, len(markets)))
    served.load_state_dict(torch.load(base_path))
    served = PeftModel.from_pretrained(served, out / "adapters" / markets[1], adapter_name=markets[1])
    for market in markets[2:]:
        served.load_adapter(out / "adapters" / market, adapter_name=market)
    mixed = test[test["market"] != markets[0]].sample(n=2048, random_state=seed)
    features, _ = _tensors(mixed)
    adapter_ids = torch.as_tensor([served.adapter_names.index(m) for m in mixed["market"]])
    routed = predict(served, features, adapter_ids=adapter_ids)
    worst = 0.0
    for index, market in enumerate(served.adapter_names):
        single = copy.deepcopy(served)
        single.set_adapter(market)
        merged = single.merge_and_unload()
        selected = adapter_ids == index
        own = predict(merged, tuple(f[selected] for f in features))
        worst = max(worst, float((routed[selected] - own).abs().max()))

    _print_table(rows, base_kb)
    print(f"routed a mixed batch of {len(mixed)} samples through {len(served.adapter_names)} adapters in one pass; "
          f"largest difference from each market's merged model: {worst:.2e}")
    summary = {"markets": rows, "base_checkpoint_kb": base_kb, "routing_max_abs_diff": worst,
               "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out / 'summary.json'}, the base checkpoint and {len(rows)} adapters under {out}")
    return summary


def _print_table(rows: list[dict], base_kb: float) -> None:
    header = f"{'market':<7}{'train':>7}{'test':>7}{'base AUC':>10}{'LoRA AUC':>10}{'trainable':>11}{'touched':>9}" \
             f"{'file KB':>9}{'% of base':>10}{'train s':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['market']:<7}{r['train_rows']:>7}{r['test_rows']:>7}{r['base_auc']:>10.4f}{r['lora_auc']:>10.4f}"
              f"{r['trainable_params']:>11,}{r['touched_params']:>9,}{r['adapter_kb']:>9.1f}"
              f"{100 * r['adapter_kb'] / base_kb:>9.1f}%{r['train_seconds']:>9.1f}")
