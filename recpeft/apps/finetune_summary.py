"""The summary of ``recpeft finetune --segments``: one row per segment, the base against each
fine-tuning method on the segment's test rows, as a table on screen, ``summary.json`` and
``summary.png`` (the demo's writers, :mod:`.demo_report`).

A row: ``segment``, ``left_out_of_pretraining`` (why the base never saw it, or None),
``{train,valid,test}_rows``, ``base_{auc,log_loss}`` and, per method trained (``lora``, ``dense``),
``<method>_{auc,log_loss,epochs,best_epoch,seconds,samples_per_second,bytes,folder,history}``
(bytes: the adapter file, or the dense copy's weights; history: FitReport.history, one dict per
epoch). The impression-weighted row averages AUC and LogLoss over the segments by test rows.
"""

from __future__ import annotations

from pathlib import Path

from recpeft.metrics import weighted_auc

from .demo_report import ARMS, figure, print_table, save_plot, save_report
from .workflow import EncodedSplit, click_metrics

WEIGHTED = "(weighted)"
LEGEND = (
    "AUC and LogLoss on each segment's rows after the time cut; (weighted): the mean over segments weighted by "
    "their test rows; *: a segment the base was pretrained without."
)


def segment_row(base, data: EncodedSplit, segment: str, left_out: str | None) -> dict:
    """A summary row's data fields and the base's scores on ``segment``'s test rows."""
    base_scores = click_metrics(base, data.segment_rows("test", segment))
    return {
        "segment": segment,
        "left_out_of_pretraining": left_out,
        **{f"{part}_rows": len(data.segment_rows(part, segment)) for part in ("train", "valid", "test")},
        "base_auc": base_scores["auc"],
        "base_log_loss": base_scores["log_loss"],
    }


def weighted_row(rows: list[dict], arms: list[str], count: str = "test_rows") -> dict:
    """The impression-weighted mean of each arm's AUC and LogLoss over ``rows`` (by each row's
    ``count`` field, its test rows; segments where a value is undefined are left out of its mean)."""
    counts = {r["segment"]: r[count] for r in rows}
    means = {
        f"{arm}_{metric}": weighted_auc({r["segment"]: r[f"{arm}_{metric}"] for r in rows}, counts)
        for arm in arms
        for metric in ("auc", "log_loss")
    }
    return {"segment": WEIGHTED, count: sum(counts.values()), **means}


def _kilobytes(size: int | None) -> str:
    return "—" if size is None else f"{size / 1024:.1f} KB"


def _columns(methods: list[str]) -> list:
    """The table's columns for the methods trained."""
    label = dict(ARMS)
    column = lambda header, key, spec: (header, len(header), lambda r: figure(r.get(key), spec))
    columns = [
        ("segment", 10, lambda r: r["segment"] + ("*" if r.get("left_out_of_pretraining") else "")),
        column("train", "train_rows", ","),
        column("test", "test_rows", ","),
    ]
    for arm in ("base", *methods):
        columns += [column(f"{label[arm].split()[0]} AUC", f"{arm}_auc", ".4f")]
        columns += [column(f"{label[arm].split()[0]} LogLoss", f"{arm}_log_loss", ".4f")]
    for method in methods:
        short = label[method].split()[0]
        columns += [column(f"{short} epochs", f"{method}_epochs", "d")]
        columns += [column(f"{short} smp/s", f"{method}_samples_per_second", ",.0f")]
        columns += [(f"{short} size", 9, lambda r, m=method: _kilobytes(r.get(f"{m}_bytes")))]
    return columns


def summarise(out: str | Path, rows: list[dict], context: dict) -> dict:
    """Print the table of ``rows`` with the impression-weighted row, and write ``out/summary.json``
    (``context``, the rows, the weighted row) and ``out/summary.png``; return the summary."""
    out = Path(out)
    methods = context["methods"]
    weighted = weighted_row(rows, ["base", *methods])
    print_table([*rows, weighted], _columns(methods), LEGEND)
    summary = {**context, "segments": rows, "impression_weighted": weighted}
    save_report(out / "summary.json", summary)
    save_plot(out / "summary.png", rows, name="segment", arms=[a for a in ARMS if a[0] in ("base", *methods)])
    print(f"wrote {out / 'summary.json'}, {out / 'summary.png'} and {len(rows) * len(methods)} models under {out}")
    return summary
