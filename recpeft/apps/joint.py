"""``finetune --segments ... --joint``: every segment's LoRA adapter trained in one pass over the
segments' mixed rows, each row routed to its own segment's adapter.

One PeftModel holds an adapter per segment (the same LoraConfig), and one Trainer run steps over
the union of the segments' training rows in a shuffled order, each batch routed per sample
(``adapter_ids``): a row's gradient reaches only its own segment's adapter, so each adapter
follows its own rows, as in a run of its own, while the base's frozen work is shared. A joint
batch holds ``batch_size`` × (number of segments) rows, ``batch_size`` per segment on average.

Early stopping is per segment, as in separate runs: after every epoch each segment's adapter is
scored on that segment's validation rows alone (the run's stop metric, AUC or LogLoss); a
segment whose metric beats its best by more than ``min_improvement`` snapshots its adapter;
one that has not improved for ``early_stopping_patience`` epochs is frozen (its adapter's
parameters stop training). With ``keep_initial`` the base's own score is each segment's first
best (an adapter that never beats it stays at its initial, zero delta). The run ends when every
segment has stopped or after ``epochs``; then each adapter gets its own best snapshot back.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

from recpeft.metrics import auc, log_loss
from recpeft.peft.config import LoraConfig
from recpeft.peft.model import PeftModel, get_peft_model
from recpeft.train import StopMetric, TrainConfig, Trainer
from recpeft.train.trainer import predict

from .workflow import EncodedSplit


class _PerSegmentStopping:
    """The Trainer's ``metric_fn``: per-segment scores, snapshots and freezing (module docstring).
    Returns the number of segment improvements so far, so the Trainer's own patience ends the
    run only when no segment has improved for ``patience`` epochs."""

    def __init__(self, model: PeftModel, valid: dict, config: TrainConfig):
        self.model, self.valid, self.config = model, valid, config
        self.metric = StopMetric(config.stop_metric)
        self.best = {s: None for s in valid}
        self.best_epoch = {s: None for s in valid}
        self.waited = dict.fromkeys(valid, 0)
        self.history: list[dict] = []
        self.snapshots: dict[str, list[torch.Tensor]] = {}
        self.improvements = 0
        self.evaluations = 0

    def parameters(self, segment: str) -> list[nn.Parameter]:
        """The segment's adapter's parameters, in every module that holds it."""
        holders = [h for h in self.model.adapter_holders().values() if segment in h.adapter_names()]
        return [p for h in holders for p in h.adapter_parameters(segment)]

    def score(self, segment: str) -> dict:
        """The segment's adapter on the segment's validation rows (each row routed to it)."""
        rows = self.valid[segment]
        routed = type(rows)(rows.encoded, route={segment: self.model.adapter_names.index(segment)})
        logits, labels = predict(self.model, routed), rows.encoded.labels
        return {"auc": auc(logits, labels), "logloss": log_loss(logits, labels)}

    def improved(self, segment: str, value: float) -> bool:
        best, delta = self.best[segment], self.config.min_improvement
        if value is None or math.isnan(value):
            return False
        if best is None:
            return True
        return value > best + delta if self.metric.higher_is_better else value < best - delta

    def __call__(self, model, source) -> float:
        epoch = self.evaluations - (1 if self.config.keep_initial else 0)  # −1: the starting weights
        self.evaluations += 1
        row = {"epoch": epoch}
        for segment in self.valid:
            scores = self.score(segment)
            row[segment] = scores
            value = scores[self.metric.value]
            if self.improved(segment, value):
                self.best[segment], self.best_epoch[segment], self.waited[segment] = value, epoch, 0
                self.snapshots[segment] = [p.detach().clone() for p in self.parameters(segment)]
                self.improvements += 1
            elif epoch >= 0:
                self.waited[segment] += 1
                patience = self.config.early_stopping_patience
                if patience is not None and self.waited[segment] >= patience:
                    for p in self.parameters(segment):
                        p.requires_grad_(False)  # this segment has stopped
        self.history.append(row)
        return float(self.improvements)

    @torch.no_grad()
    def restore(self) -> None:
        for segment, saved in self.snapshots.items():
            for p, value in zip(self.parameters(segment), saved):
                p.copy_(value)
        for segment in self.valid:
            for p in self.parameters(segment):
                p.requires_grad_(True)


def finetune_jointly(
    base: nn.Module,
    data: EncodedSplit,
    segments: list[str],
    *,
    lora_config: LoraConfig,
    train_config: TrainConfig,
    device=None,
) -> tuple[PeftModel, dict]:
    """A copy of ``base`` with one adapter per segment (named by the segment), trained jointly
    (module docstring). Returns the model and {"report": the Trainer's FitReport, "best_epoch":
    {segment: epoch, −1 the base}, "best": {segment: its best validation metric}, "history":
    per-epoch per-segment validation scores}."""
    if not segments:
        raise ValueError("finetune_jointly: no segments")
    torch.manual_seed(train_config.seed)
    model = get_peft_model(copy.deepcopy(base), lora_config, adapter_name=segments[0])
    for segment in segments[1:]:
        model.add_adapter(segment, lora_config)
    route = {s: i for i, s in enumerate(segments)}
    train = data.segment_rows("train", segments)
    train = type(train)(train.encoded, route=route)
    valid = {s: data.segment_rows("valid", s) for s in segments}
    missing = [s for s, rows in valid.items() if len(rows) == 0]
    if missing:
        raise ValueError(f"--joint: segments {missing} have no validation rows to stop on")
    stopping = _PerSegmentStopping(model, valid, train_config)
    # the Trainer follows the count of segment improvements: no δ there (each segment has its own);
    # a joint batch holds batch_size rows per segment on average, so an adapter takes about as
    # many optimizer steps per epoch as in a run of its own (Adam's step size does not shrink
    # with the rows a step sees: batches of batch_size mixed rows would give each adapter
    # n_segments times the steps, and an epoch, the early-stopping grain, too many of them)
    config = dataclasses.replace(
        train_config,
        stop_metric=StopMetric.AUC,
        min_improvement=0.0,
        batch_size=train_config.batch_size * len(segments),
        desc="joint",
    )
    trainer = Trainer(model, config, metric_fn=stopping, metric_mode="max", device=device)
    report = trainer.fit(train, next(iter(valid.values())), resume=False)
    stopping.restore()
    return model.eval(), {
        "report": report,
        "best_epoch": stopping.best_epoch,
        "best": stopping.best,
        "history": stopping.history,
    }
