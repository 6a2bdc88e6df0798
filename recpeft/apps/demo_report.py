"""The demo's report: a table on the terminal, JSON and a PNG plot on disk (written atomically).

Each row is one market with keys ``market``, ``base_auc``, ``lora_auc``, ``dense_auc``,
``{lora,dense}_trainable_params``, ``{lora,dense}_samples_per_second``,
``{lora,dense}_train_state_bytes``, ``adapter_bytes``, ``adapter_share``, train/test row counts.
The writers take other columns, a legend and another name key too: ``finetune --segments``'
summary (:mod:`.finetune_summary`) is written with them.
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


LEGEND = (
    "AUC on each market's rows after the time cut. params: trainable (share of the base); state: "
    "parameters + gradients + optimizer state while training (CPU; CUDA reports its peak)."
)
#: the models a plot compares: (key prefix of their row fields, label)
ARMS = (("base", "base"), ("lora", "LoRA"), ("dense", "dense fine-tuning"))


def figure(value, spec: str) -> str:
    """``value`` formatted by ``spec``, or "—" where it is missing or not a finite number."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "—"
    return format(value, spec)


def print_table(rows: list[dict], columns=COLUMNS, legend: str = LEGEND) -> None:
    """One line per row (``columns``: header, minimum width, row → text; the first is left-aligned),
    then the legend."""
    widths = [max(width, len(header), *(len(fmt(r)) for r in rows)) + 1 for header, width, fmt in columns]
    line = lambda cells: "".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    print(line([header for header, _, _ in columns]))
    print("-" * sum(widths))
    for row in rows:
        print(line([fmt(row) for _, _, fmt in columns]))
    print(legend)


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


def _finite(values) -> list[float]:
    return [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]


def _bars(axis, rows: list[dict], arms, suffix: str, names: list[str]) -> list[float]:
    """One bar group per row, a bar per arm (its ``<prefix>_<suffix>`` field; missing: no bar);
    the finite heights drawn."""
    width = 0.8 / len(arms)
    drawn = []
    for k, (prefix, label) in enumerate(arms):
        heights = [row.get(f"{prefix}_{suffix}") for row in rows]
        heights = [h if _finite([h]) else float("nan") for h in heights]
        offset = (k - (len(arms) - 1) / 2) * width
        color = f"C{[a[0] for a in ARMS].index(prefix)}" if prefix in dict(ARMS) else None  # one colour per arm
        axis.bar([i + offset for i in range(len(rows))], heights, width=width, label=label, color=color)
        drawn += _finite(heights)
    axis.set_xticks(list(range(len(rows))), names)
    axis.legend(loc="upper left", ncols=len(arms), fontsize=8)
    return drawn


def save_plot(path: str | Path, rows: list[dict], *, name: str = "market", arms=ARMS) -> None:
    """Two panels: test AUC per row (its ``name`` field) for each of ``arms`` that has one, and
    fine-tuning samples/s of the arms that trained."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(r[name]) for r in rows]
    scored = [a for a in arms if any(_finite([r.get(f"{a[0]}_auc")]) for r in rows)]
    trained = [a for a in arms if any(f"{a[0]}_samples_per_second" in r for r in rows)]
    fig, (quality, speed) = plt.subplots(1, 2, figsize=(max(11, 1.2 * len(rows)), 4))
    aucs = _bars(quality, rows, scored, "auc", names) if scored else []
    if aucs:
        quality.set_ylim(max(0.0, min(aucs) - 0.05), min(1.0, max(aucs) + 0.04))
    quality.set_ylabel("test AUC")
    quality.set_title(f"quality per {name}")
    speeds = _bars(speed, rows, trained, "samples_per_second", names) if trained else []
    speed.set_ylabel("training samples/s")
    speed.set_title("fine-tuning throughput")
    speed.set_ylim(0, 1.25 * max(speeds, default=1.0) or 1.0)
    save_figure(fig, path)


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Lay ``fig`` out, write it to ``path`` as PNG atomically (the old file or the new one,
    never half of one) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)
