"""The demo's report: a table on the terminal, JSON and a PNG plot on disk (written atomically).

Each row is one market with keys ``market``, ``base_auc``, ``lora_auc``, ``dense_auc``,
``{lora,dense}_trainable_params``, ``{lora,dense}_samples_per_second``,
``{lora,dense}_train_state_bytes``, ``adapter_bytes``, ``adapter_share``, train/test row counts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from recpeft.utils.atomic import atomic_path, atomic_write_text

COLUMNS = [  # (header, width, format of the row → text)
    ("market", 7, lambda r: f"{r['market']}"),
    ("train", 7, lambda r: f"{r['train_rows']:,}"),
    ("test", 6, lambda r: f"{r['test_rows']:,}"),
    ("base AUC", 9, lambda r: f"{r['base_auc']:.4f}"),
    ("LoRA AUC", 9, lambda r: f"{r['lora_auc']:.4f}"),
    ("dense AUC", 10, lambda r: f"{r['dense_auc']:.4f}"),
    (
        "LoRA params",
        12,
        lambda r: f"{r['lora_trainable_params']:,} ({100 * r['lora_trainable_params'] / r['base_params']:.1f}%)",
    ),
    ("adapter", 9, lambda r: f"{r['adapter_bytes'] / 1024:.1f} KB"),
    ("% of base", 10, lambda r: f"{100 * r['adapter_share']:.2f}%"),
    ("LoRA s", 7, lambda r: f"{r['lora_seconds']:.1f}"),
    ("dense s", 8, lambda r: f"{r['dense_seconds']:.1f}"),
    ("LoRA smp/s", 11, lambda r: f"{r['lora_samples_per_second']:,.0f}"),
    ("dense smp/s", 12, lambda r: f"{r['dense_samples_per_second']:,.0f}"),
    ("LoRA state", 11, lambda r: f"{r['lora_train_state_bytes'] / 2**20:.2f} MiB"),
    ("dense state", 12, lambda r: f"{r['dense_train_state_bytes'] / 2**20:.2f} MiB"),
]


def print_table(rows: list[dict]) -> None:
    """One line per market; the legend says what the memory column counts."""
    widths = [max(width, len(header), *(len(fmt(r)) for r in rows)) + 1 for header, width, fmt in COLUMNS]
    print("".join(h.rjust(w) if i else h.ljust(w) for i, ((h, _, _), w) in enumerate(zip(COLUMNS, widths))))
    print("-" * sum(widths))
    for row in rows:
        print(
            "".join(
                fmt(row).rjust(w) if i else fmt(row).ljust(w) for i, ((_, _, fmt), w) in enumerate(zip(COLUMNS, widths))
            )
        )
    print(
        "AUC on each market's rows after the time cut. params: trainable (share of the base); state: "
        "parameters + gradients + optimizer state while training (CPU; CUDA reports its peak)."
    )


def _clean(value):
    """JSON has no NaN: write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def save_report(path: str | Path, report: dict) -> None:
    atomic_write_text(path, json.dumps(_clean(report), indent=2, default=str) + "\n")


def save_plot(path: str | Path, rows: list[dict]) -> None:
    """Two panels: AUC per market (base, LoRA, dense) and fine-tuning samples/s (LoRA, dense)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markets = [r["market"] for r in rows]
    x = range(len(rows))
    fig, (quality, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for offset, (key, label) in zip(
        (-0.27, 0.0, 0.27), (("base_auc", "base"), ("lora_auc", "LoRA"), ("dense_auc", "dense fine-tuning"))
    ):
        quality.bar([i + offset for i in x], [r[key] for r in rows], width=0.27, label=label)
    low = min(r["base_auc"] for r in rows)
    high = max(max(r["lora_auc"], r["dense_auc"]) for r in rows)
    quality.set_ylim(max(0.0, low - 0.05), min(1.0, high + 0.04))
    quality.set_xticks(list(x), markets)
    quality.set_ylabel("test AUC")
    quality.set_title("quality per market")
    quality.legend(loc="upper left", ncols=3, fontsize=8)
    for offset, (key, label) in zip(
        (-0.2, 0.2), (("lora_samples_per_second", "LoRA"), ("dense_samples_per_second", "dense fine-tuning"))
    ):
        speed.bar([i + offset for i in x], [r[key] for r in rows], width=0.4, label=label)
    speed.set_xticks(list(x), markets)
    speed.set_ylabel("training samples/s")
    speed.set_title("fine-tuning throughput")
    speed.set_ylim(0, 1.25 * max(max(r["lora_samples_per_second"], r["dense_samples_per_second"]) for r in rows))
    speed.legend(loc="upper left", ncols=2, fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
