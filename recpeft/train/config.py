"""The settings of a :class:`~recpeft.train.Trainer` run (:class:`TrainConfig`) and what a run
did (:class:`FitReport`).

A :class:`TrainConfig` checks every field when it is built (a bad value raises a ValueError naming
the field) and round-trips through a dict / JSON (``to_dict``/``from_dict``, ``to_json``/``from_json``);
a checkpoint stores it so that a resumed run can refuse settings that would change its trajectory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from enum import Enum

from recpeft.utils.validation import check_bool, check_fraction, check_int, check_positive_number, parse_json_object

from .schedules import Schedule


class StopMetric(str, Enum):
    """The built-in validation metric that early stopping and the best-epoch choice follow
    (:mod:`recpeft.metrics`): ``auc`` (higher is better) or ``logloss`` (mean binary
    cross-entropy of σ(logit), lower is better)."""

    AUC = "auc"
    LOGLOSS = "logloss"

    @property
    def higher_is_better(self) -> bool:
        return self is StopMetric.AUC


@dataclass
class TrainConfig:
    """Settings of a :class:`~recpeft.train.Trainer` run.

    Args:
        epochs: passes over the training rows (≥ 1); the learning-rate schedule spans them all.
        stop_after_epochs: run only the first this many of the ``epochs`` (1 ≤ value ≤ epochs),
            the schedule unchanged, or None (default) for all: the refit of a repeated-holdout
            choice (:mod:`recpeft.train.repeated_holdout`) retraces its holdouts' schedule and
            stops where their mean validation curve peaked.
        batch_size: rows per optimizer step (≥ 1); the last batch of an epoch may be smaller.
        lr: peak learning rate (> 0).
        weight_decay: decoupled weight decay λ (≥ 0) of AdamW.
        warmup_fraction: W = ⌊warmup_fraction · T⌋ linear-warmup steps of the T planned ones, in [0, 1].
        schedule: after warmup, ``constant`` or ``cosine`` down to ``min_lr_ratio · lr``.
        min_lr_ratio: cosine floor in [0, 1].
        clip_grad_norm: max global L2 norm of the gradients (> 0), or None for no clipping.
        early_stopping_patience: epochs without improvement of the validation metric before
            stopping (≥ 1), or None to run every epoch; the best epoch's weights are restored
            whenever a validation source is given.
        stop_metric: the built-in validation metric that early stopping and the best epoch
            follow, :class:`StopMetric` ``auc`` (default) or ``logloss``; both are reported in
            every history row whichever one stops. A Trainer given its own ``metric_fn`` uses
            that instead (and refuses ``logloss`` here, which it would ignore).
        min_improvement: δ ≥ 0. An epoch improves only when its metric m beats the best so far
            by more than δ: m > best + δ (AUC), m < best − δ (LogLoss). An epoch that does not
            improve counts toward the patience and does not replace the best weights, so gains
            below δ (noise on a small validation slice) neither reset the patience nor get kept.
        keep_initial: evaluate the starting weights before training (epoch −1 of the best-epoch
            choice, not in ``history``); if no epoch improves on them (by more than
            ``min_improvement``) they are restored. Needs a validation source to have any effect.
        seed: seeds the torch RNG at the start of a fresh run and every epoch's row order.
        amp: bf16 autocast of the forward pass on CUDA; ignored elsewhere.
        eval_batch_size: rows per forward pass in evaluation (≥ 1).
        checkpoint_dir: folder for checkpoints, or None for none.
        checkpoint_every_steps: also checkpoint every this many optimizer steps (≥ 1), or None.
        progress: show a tqdm bar of trained samples.
        desc: the bar's label.
    """

    epochs: int = 3
    stop_after_epochs: int | None = None
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    warmup_fraction: float = 0.05
    schedule: Schedule = Schedule.COSINE
    min_lr_ratio: float = 0.0
    clip_grad_norm: float | None = 1.0
    early_stopping_patience: int | None = 2
    stop_metric: StopMetric = StopMetric.AUC
    min_improvement: float = 0.0
    keep_initial: bool = False
    seed: int = 0
    amp: bool = True
    eval_batch_size: int = 8192
    checkpoint_dir: str | None = None
    checkpoint_every_steps: int | None = None
    progress: bool = True
    desc: str = "train"

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size"):
            check_int(f"TrainConfig.{name}", getattr(self, name))
        check_int("TrainConfig.seed", self.seed, minimum=0)
        for name in ("early_stopping_patience", "checkpoint_every_steps", "stop_after_epochs"):
            if getattr(self, name) is not None:
                check_int(f"TrainConfig.{name} (or None)", getattr(self, name))
        if self.stop_after_epochs is not None and self.stop_after_epochs > self.epochs:
            raise ValueError(
                f"TrainConfig.stop_after_epochs must be at most epochs ({self.epochs}), got {self.stop_after_epochs}"
            )
        check_positive_number("TrainConfig.lr", self.lr)
        check_positive_number("TrainConfig.weight_decay", self.weight_decay, allow_zero=True)
        for name in ("warmup_fraction", "min_lr_ratio"):
            check_fraction(f"TrainConfig.{name}", getattr(self, name))
        if self.clip_grad_norm is not None:
            check_positive_number("TrainConfig.clip_grad_norm (or None)", self.clip_grad_norm)
        self.schedule = _member(Schedule, "schedule", self.schedule)
        self.stop_metric = _member(StopMetric, "stop_metric", self.stop_metric)
        check_positive_number("TrainConfig.min_improvement", self.min_improvement, allow_zero=True)
        for name in ("amp", "progress", "keep_initial"):
            check_bool(f"TrainConfig.{name}", getattr(self, name))
        if not isinstance(self.desc, str):
            raise ValueError(f"TrainConfig.desc must be a string, got {self.desc!r}")
        if self.checkpoint_dir is not None:
            if not isinstance(self.checkpoint_dir, (str, os.PathLike)) or not str(self.checkpoint_dir):
                raise ValueError(
                    f"TrainConfig.checkpoint_dir must be a folder path or None, got {self.checkpoint_dir!r}"
                )
            self.checkpoint_dir = str(self.checkpoint_dir)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["schedule"] = self.schedule.value
        data["stop_metric"] = self.stop_metric.value
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "TrainConfig") -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown TrainConfig keys {unknown}")
        try:
            return cls(**data)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{source}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "TrainConfig JSON") -> TrainConfig:
        return cls.from_dict(parse_json_object(text, source), source)


def _member(kind: type[Enum], name: str, value) -> Enum:
    """``kind(value)``, or a one-line ValueError naming ``TrainConfig.<name>`` and the choices."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"TrainConfig.{name} must be one of {[m.value for m in kind]}, got {value!r}") from None


@dataclass
class FitReport:
    """What a :meth:`~recpeft.train.Trainer.fit` call did.

    ``epochs_run``, ``steps``, ``samples``, ``final_loss`` and ``history`` cover the whole run,
    including the part before a resumed checkpoint (``resumed_from_step`` > 0). ``seconds`` is this
    call's wall time; ``samples_per_second`` is the samples this call trained over the seconds it
    spent in training steps (building and moving the batch, forward, backward, clipping,
    optimizer), evaluation and checkpoint writes excluded. ``history`` holds one dict per epoch:
    epoch, train_loss (row-weighted mean of the batch losses), valid_metric (the metric that
    stops: ``stop_metric``'s or the trainer's ``metric_fn``'s; None without a validation source),
    with the built-in metrics also valid_auc and valid_logloss (both, whichever stops; None without
    a validation source), lr (at the epoch's last step). ``best_metric`` is the stopping metric of
    the kept weights; ``initial_metric`` the starting weights' (with ``keep_initial`` and a
    validation source; None otherwise, and after a resume); ``best_scores`` the kept weights'
    {"auc", "logloss"} with the built-in metrics (None otherwise). ``best_epoch`` is −1 when
    ``keep_initial`` kept the starting weights. Memory: see
    :func:`~recpeft.train.memory.training_state_bytes`;
    ``peak_memory_bytes`` is CUDA's ``max_memory_allocated`` during the call minus the allocation
    at its start (None on CPU). ``device``: where it trained (``"cpu"``, ``"cuda:0 (NVIDIA H200)"``).
    """

    epochs_run: int
    steps: int
    samples: int
    seconds: float
    samples_per_second: float
    final_loss: float
    best_metric: float | None
    best_epoch: int | None
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    best_scores: dict[str, float] | None = None
    initial_metric: float | None = None
    resumed_from_step: int = 0
    training_state_bytes: int = 0
    peak_memory_bytes: int | None = None
    device: str = "cpu"
