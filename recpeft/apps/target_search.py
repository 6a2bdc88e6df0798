"""``--target-modules auto``: choose what a segment's adapter adapts, its rank and its learning
rate on the segment's validation rows only, within about twice the cost of one fine-tune.

The candidates are groups of a click model's modules (:func:`target_groups`): its attribute
tables (every sparse feature but user and item), its id tables (user and item), the dense arch and
the over arch; with ``--new-id-rows``, also ``new_ids``: the tables of those features with rows
of the adapter's own for the segment's new ids (``new_rows``). Two stages of short probes, each a
fine-tune of ``probe_epochs`` epochs (1 by default) started from the base with the run's training
settings:

1. every target set of :data:`TARGET_SETS` (and of :data:`NEW_ID_SETS` when there are new ids)
   at the run's rank r and learning rate η;
2. the best set at ranks r/2 and 4r (within [2, 16]) and at η/3 and 3η, one change at a time.

Each probe is scored by the run's stopping metric on the validation rows (AUC higher, LogLoss
lower is better; the base's own score is listed as the reference). With a size budget
(``max_bytes``, the command line's ``--max-adapter-share`` of the base), a probe whose adapter
file is larger ranks after every probe within it: a probe's file is what its full fine-tune's
would be, since one epoch touches the same table rows as ten. The best probe's settings
then get the full fine-tune. With E epochs, the probes cost about (5 + 4)·probe_epochs epochs,
(two more with new ids), so the search and the final fine-tune together take about 1.9× one
fine-tune at E = 10. The
test rows never enter: the ranking is the validation metric's.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from recpeft.peft.config import LoraConfig
from recpeft.train import StopMetric, TrainConfig

from .new_id_rows import lora_with_new_rows

#: target sets tried in stage 1: names of :func:`target_groups` joined
TARGET_SETS = (
    ("attributes", "dense_arch", "over_arch"),
    ("over_arch",),
    ("attributes", "over_arch"),
    ("dense_arch", "over_arch"),
    ("attributes", "ids", "dense_arch", "over_arch"),
)
#: tried too when the segment has new ids: the first and the widest set with their tables and rows
NEW_ID_SETS = (
    ("attributes", "new_ids", "dense_arch", "over_arch"),
    ("attributes", "ids", "new_ids", "dense_arch", "over_arch"),
)
MIN_RANK, MAX_RANK = 2, 16


def target_groups(model, user: str, item: str) -> dict[str, list[str]]:
    """Module-name groups of a :class:`~recpeft.models.dlrm.ClickDLRM`: ``attributes`` (the
    tables of every feature but ``user`` and ``item``), ``ids`` (those two tables), ``dense_arch``
    and ``over_arch`` (their linear layers)."""
    everything = model.lora_targets()
    tables = [t for t in everything if t.startswith("sparse_arch.")]
    ids = model.lora_targets(frozen_features=[f for f in model.features if f not in (user, item)])
    id_tables = [t for t in ids if t.startswith("sparse_arch.")]
    return {
        "attributes": [t for t in tables if t not in id_tables],
        "ids": id_tables,
        "dense_arch": [t for t in everything if t.startswith("dense_arch.")],
        "over_arch": [t for t in everything if t.startswith("over_arch.")],
    }


@dataclass(frozen=True)
class Probe:
    """One candidate: target groups, rank, learning rate; and what its short fine-tune scored."""

    groups: tuple[str, ...]
    r: int
    lr: float
    valid_auc: float | None = None
    valid_logloss: float | None = None
    bytes: int | None = None  # its adapter file

    @property
    def name(self) -> str:
        return "+".join(self.groups)


def _better(metric: StopMetric, max_bytes: int | None = None) -> Callable[[Probe], tuple]:
    """Sort key: larger is better; within ``max_bytes`` first."""
    if metric is StopMetric.AUC:
        score = lambda p: -math.inf if p.valid_auc is None or math.isnan(p.valid_auc) else p.valid_auc
    else:
        score = lambda p: -math.inf if p.valid_logloss is None or math.isnan(p.valid_logloss) else -p.valid_logloss
    return lambda p: (within_budget(p, max_bytes), score(p))


def within_budget(probe: Probe, max_bytes: int | None) -> bool:
    """Whether ``probe``'s adapter file fits in ``max_bytes`` (None: no budget)."""
    return max_bytes is None or probe.bytes is None or probe.bytes <= max_bytes


def stage_two(best: Probe) -> list[Probe]:
    """The best set at ranks r/2 and 4r (clamped to [2, 16], duplicates dropped) and at η/3, 3η."""
    ranks = sorted({min(MAX_RANK, max(MIN_RANK, r)) for r in (best.r // 2, best.r * 4)} - {best.r})
    probes = [dataclasses.replace(best, r=r, valid_auc=None, valid_logloss=None) for r in ranks]
    probes += [dataclasses.replace(best, lr=best.lr * f, valid_auc=None, valid_logloss=None) for f in (1 / 3, 3.0)]
    return probes


def search_targets(
    groups: dict[str, list[str]],
    lora: LoraConfig,
    train_config: TrainConfig,
    run_probe: Callable[[LoraConfig, TrainConfig], dict],
    probe_epochs: int = 1,
    new_rows: dict[str, int] | None = None,
    max_bytes: int | None = None,
) -> tuple[Probe, list[Probe]]:
    """(the best probe, every probe best first). ``run_probe(lora_config, train_config)`` fine-tunes
    a fresh copy of the base and returns its kept epoch's validation ``{"auc", "logloss"}``
    (:attr:`~recpeft.train.FitReport.best_scores`); a probe with the ``new_ids`` group (the
    tables of ``new_rows``: table → new ids) has ``new_rows`` in its config, and ``run_probe``
    gives it rows encoded with those ids; its ``"bytes"``, the probe's adapter file, ranks it
    after every probe within ``max_bytes``. Target sets whose groups are all empty in this model
    are skipped."""
    short = dataclasses.replace(train_config, epochs=probe_epochs, desc=f"{train_config.desc} probe")
    better = _better(train_config.stop_metric, max_bytes)

    def scored(probe: Probe) -> Probe:
        scores = run_probe(chosen_config(probe, groups, lora, new_rows), dataclasses.replace(short, lr=probe.lr))
        return dataclasses.replace(
            probe, valid_auc=scores.get("auc"), valid_logloss=scores.get("logloss"), bytes=scores.get("bytes")
        )

    groups = {**groups, "new_ids": list(new_rows or {})}
    sets = [s for s in TARGET_SETS + (NEW_ID_SETS if new_rows else ()) if any(groups[g] for g in s)]
    first = [scored(Probe(tuple(g for g in s if groups[g]), lora.r, train_config.lr)) for s in sets]
    leader = max(first, key=better)
    probes = first + [scored(p) for p in stage_two(leader)]
    ranking = sorted(probes, key=better, reverse=True)
    return ranking[0], ranking


def chosen_config(
    best: Probe, groups: dict[str, list[str]], lora: LoraConfig, new_rows: dict[str, int] | None = None
) -> LoraConfig:
    """``lora`` with the best probe's targets and rank (α scaled with r: the same s = α/r); with
    the ``new_ids`` group, its tables' ``new_rows`` too (each starting as the new-id row, −1)."""
    groups = {**groups, "new_ids": []}  # its tables come with their rows, below
    targets = [m for g in best.groups for m in groups[g]]
    config = dataclasses.replace(lora, r=best.r, lora_alpha=lora.lora_alpha * best.r / lora.r, target_modules=targets)
    return lora_with_new_rows(config, new_rows) if "new_ids" in best.groups else config


def ranking_record(ranking: list[Probe], metric: StopMetric, probe_epochs: int, max_bytes: int | None = None) -> dict:
    """The search as JSON: the metric, the probes' length, the size budget and every probe best first."""
    return {
        "metric": StopMetric(metric).value,
        "probe_epochs": probe_epochs,
        "split": "validation rows of the segment (the test rows never choose)",
        "max_bytes": max_bytes,
        "probes": [
            {
                "targets": p.name,
                "r": p.r,
                "lr": p.lr,
                "valid_auc": p.valid_auc,
                "valid_logloss": p.valid_logloss,
                "bytes": p.bytes,
                "within_budget": within_budget(p, max_bytes),
            }  # fmt: skip
            for p in ranking
        ],
    }


def ranking_table(ranking: list[Probe], max_bytes: int | None = None) -> str:
    """The probes, best first, as a text table (adapter size; ``*``: over ``max_bytes``)."""
    lines = [f"{'targets':<44} {'r':>3} {'lr':>9} {'valid AUC':>10} {'LogLoss':>8} {'adapter':>10}"]
    for p in ranking:
        auc = "n/a" if p.valid_auc is None else f"{p.valid_auc:.4f}"
        loss = "n/a" if p.valid_logloss is None else f"{p.valid_logloss:.4f}"
        size = "n/a" if p.bytes is None else f"{p.bytes / 1024:.1f} KB" + ("" if within_budget(p, max_bytes) else "*")
        lines.append(f"{p.name:<44} {p.r:>3} {p.lr:>9.2g} {auc:>10} {loss:>8} {size:>10}")
    return "\n".join(lines)
