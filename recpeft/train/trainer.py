"""The Trainer: one loop for LoRA adapters and for dense fine-tuning of a whole model.

The loop optimizes the model's trainable parameters (``requires_grad``) on mini-batches of a
:class:`~recpeft.datasets.batch.BatchSource`. Each optimizer step t (0-based, T planned) does:

    loss  = loss_fn(model, batch)           default: BCE(σ(model(*args, **kwargs)), labels), mean over B
    g     = ∇loss;  if ‖g‖₂ > c: g ← g · c / ‖g‖₂     (‖g‖₂ over every dense and sparse gradient)
    lr_t  = lr · f(t)                       f: warmup + constant/cosine (:mod:`recpeft.train.schedules`)
    AdamW step with lr_t and decoupled weight decay λ

Optimizers and clipping: :mod:`recpeft.train.optimizers` (sparse-gradient parameters go to
:class:`~recpeft.train.lora_adamw.LoraAdamW`, the rest to ``torch.optim.AdamW``). A sparse gradient on any
other parameter raises a TypeError naming it.

Epochs. Epoch e visits the rows in the order :func:`epoch_order` (``torch.randperm(N)`` from a
generator seeded by (seed, e)), so a resumed run regenerates it. After each epoch the validation
metric decides early stopping: by default one pass of :func:`predict` over the validation rows
gives both AUC and LogLoss (:func:`click_scores`), both go into the epoch's history row, and
``stop_metric`` (:class:`~recpeft.train.config.StopMetric`) names the one that decides; a
``metric_fn`` replaces them. Epoch e improves when m_e > best + δ (higher is better: AUC, or a
``metric_fn`` in "max" mode) or m_e < best − δ (LogLoss, "min"), δ = ``min_improvement``;
``early_stopping_patience`` epochs in a row without improving ends training, and the best epoch's
trainable parameters and buffers are restored at the end. With ``keep_initial`` the starting
weights are evaluated first, as epoch −1, and compete with the epochs under the same rule: a run
where no epoch beats them ends with the model unchanged (``best_epoch == -1``).

Checkpoints and resume: :mod:`recpeft.train.run_state`. Settings and report:
:mod:`recpeft.train.config`; memory accounting: :mod:`recpeft.train.memory`.

Example::

    trainer = Trainer(model, TrainConfig(epochs=3, lr=3e-3, checkpoint_dir="ckpt"))
    report = trainer.fit(TensorBatches(users, items, labels=clicks), valid_source)
    scores = predict(model, test_source)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from recpeft.datasets.batch import Batch, BatchSource
from recpeft.metrics import auc, log_loss
from recpeft.utils.devices import AUTO, describe_device, resolve_device
from recpeft.utils.validation import check_int

from .config import FitReport, StopMetric, TrainConfig
from .memory import training_state_bytes
from .optimizers import build_optimizers, clip_grad_norm, set_lr, split_by_gradient_kind
from .run_state import (
    RunState,
    latest_checkpoint,
    load_trainable_state,
    resume_from,
    save_checkpoint,
    trainable_state,
)
from .schedules import LRSchedule, warmup_steps_for


def epoch_order(rows: int, seed: int, epoch: int) -> torch.Tensor:
    """The row order of ``epoch``: a permutation of [0, rows) from a generator seeded by
    (seed, epoch), int64 [rows]."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(rows, generator=generator)


# ---- prediction -------------------------------------------------------------------------------


@torch.no_grad()
def predict(model: nn.Module, source, batch_size: int = 8192, **kwargs) -> torch.Tensor:
    """The model's outputs for every row of ``source``, in row order, in eval mode, concatenated
    along dim 0 ([N] for a click model). ``source`` is a :class:`BatchSource` (features without
    labels: ``TensorBatches(*features, labels=torch.zeros(N))``); ``kwargs`` go to every call."""
    check_int("batch_size", batch_size)
    if not hasattr(source, "batch"):
        raise TypeError(f"predict: source must be a BatchSource (with .batch and len()), got {type(source).__name__}")
    device = _model_device(model)
    model.eval()
    rows = len(source)
    outputs = []
    for begin in range(0, rows, batch_size):
        batch = source.batch(torch.arange(begin, min(begin + batch_size, rows))).to(device)
        outputs.append(model(*batch.args, **batch.kwargs, **kwargs))
    return torch.cat(outputs) if outputs else torch.zeros(0)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    return torch.device("cpu")


# ---- the default loss and metric ---------------------------------------------------------------


def bce_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean binary cross-entropy of the logits ``model(*batch.args, **batch.kwargs)`` [B] (or any
    shape of B elements) against ``batch.labels`` [B] in {0, 1}, computed in float32."""
    logits = model(*batch.args, **batch.kwargs)
    labels = batch.labels
    if logits.numel() != labels.numel():
        raise ValueError(
            f"the model returned {tuple(logits.shape)} logits for a batch of {labels.numel()} "
            f"labels; pass a loss_fn for models that do not return one logit per row"
        )
    return nn.functional.binary_cross_entropy_with_logits(logits.reshape(labels.shape).float(), labels.float())


def _labels_of(source: BatchSource, batch_size: int) -> torch.Tensor:
    return torch.cat(
        [
            source.batch(torch.arange(b, min(b + batch_size, len(source)))).labels
            for b in range(0, len(source), batch_size)
        ]
    )


def auc_metric(model: nn.Module, source: BatchSource, batch_size: int = 8192) -> float:
    """AUC of :func:`predict`'s scores against the source's labels."""
    return auc(predict(model, source, batch_size), _labels_of(source, batch_size))


def click_scores(model: nn.Module, source: BatchSource, batch_size: int = 8192) -> dict[str, float]:
    """``{"auc", "logloss"}`` of one :func:`predict` pass (logits) against the source's labels:
    AUC and mean binary cross-entropy of σ(logit) (:mod:`recpeft.metrics`, float64)."""
    logits, labels = predict(model, source, batch_size), _labels_of(source, batch_size)
    return {StopMetric.AUC.value: auc(logits, labels), StopMetric.LOGLOSS.value: log_loss(logits, labels)}


# ---- the trainer ------------------------------------------------------------------------------


def improves(metric: float, best: float | None, mode: str, min_improvement: float) -> bool:
    """The improvement rule of early stopping: m > best + δ (``mode`` "max") or m < best − δ
    ("min"), δ = ``min_improvement``; the first metric of a run (``best`` None) always improves."""
    if best is None:
        return True
    return metric > best + min_improvement if mode == "max" else metric < best - min_improvement


class Trainer:
    """Trains ``model``'s trainable parameters with :class:`TrainConfig` (see the module docstring).

    Args:
        model: any ``nn.Module``; freeze what should not train (``get_peft_model`` does it for
            adapters; for dense fine-tuning leave every parameter trainable).
        config: the run's settings.
        loss_fn: ``loss_fn(model, batch) -> scalar tensor``; default :func:`bce_loss`.
        metric_fn: ``metric_fn(model, source) -> float``, the validation metric; default: the
            built-in AUC and LogLoss (:func:`click_scores`), ``config.stop_metric`` deciding.
            Called in eval mode under ``torch.no_grad()``.
        metric_mode: ``"max"`` (higher is better) or ``"min"`` for a ``metric_fn`` (default
            "max"); with the built-in metrics it follows ``config.stop_metric`` and may be left
            out (a contradicting value is refused).
        device: where to train: "auto" (default: CUDA when present, else the CPU), "cpu",
            "cuda" or "cuda:N" (:func:`recpeft.utils.devices.resolve_device`); the model is
            moved there, and batches follow it (pinned, without blocking, on CUDA).
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        *,
        loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
        metric_fn: Callable[[nn.Module, BatchSource], float] | None = None,
        metric_mode: str | None = None,
        device: torch.device | str | None = AUTO,
    ):
        if metric_mode not in ("max", "min", None):
            raise ValueError(f"metric_mode must be 'max' or 'min', got {metric_mode!r}")
        self.config = config if config is not None else TrainConfig()
        if not isinstance(self.config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(self.config).__name__}")
        stop = self.config.stop_metric
        if metric_fn is not None and stop is not StopMetric.AUC:
            raise ValueError(
                f"TrainConfig.stop_metric={stop.value!r} picks a built-in metric, but a metric_fn is given "
                "and decides instead; leave stop_metric at 'auc' and set metric_mode for the metric_fn"
            )
        implied = "max" if stop.higher_is_better else "min"
        if metric_fn is None and metric_mode not in (None, implied):
            raise ValueError(
                f"metric_mode={metric_mode!r} contradicts TrainConfig.stop_metric={stop.value!r} "
                f"({'higher' if stop.higher_is_better else 'lower'} is better); leave metric_mode out"
            )
        self.device = resolve_device(device)
        self.model = model.to(self.device)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not self.trainable:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to train")
        self.loss_fn = loss_fn or bce_loss
        self.metric_fn = metric_fn
        self.metric_mode = implied if metric_fn is None else metric_mode or "max"
        self.amp = self.config.amp and self.device.type == "cuda"
        self.optimizers: list[torch.optim.Optimizer] = []
        self._dense_params: list[tuple[str, nn.Parameter]] = []

    # ---- optimizers ----------------------------------------------------------------------

    def _build_optimizers(self) -> None:
        """Fresh optimizers for the trainable parameters (:func:`build_optimizers`)."""
        self._dense_params, _ = split_by_gradient_kind(self.model, self.trainable)
        self.optimizers = build_optimizers(
            self.model, self.config.lr, self.config.weight_decay, named_parameters=self.trainable
        )

    # ---- one step ------------------------------------------------------------------------

    def _step(self, batch: Batch, lr: float, check_sparse: bool) -> float:
        set_lr(self.optimizers, lr)
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.amp):
            loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(
                f"loss_fn must return a scalar tensor, got {type(loss).__name__} {tuple(getattr(loss, 'shape', ()))}"
            )
        loss.backward()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"the training loss is {value} (lr {lr:.3g}); lower lr or check the inputs")
        if check_sparse:
            for name, p in self._dense_params:
                if p.grad is not None and p.grad.is_sparse:
                    raise TypeError(
                        f"parameter {name} got a sparse gradient but is not an embedding with "
                        f"sparse=True or a LoRA table adapter; torch AdamW cannot step it"
                    )
        if self.config.clip_grad_norm is not None:
            clip_grad_norm([p for _, p in self.trainable], self.config.clip_grad_norm)
        for optimizer in self.optimizers:
            optimizer.step()
        return value

    # ---- evaluation ----------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, source: BatchSource) -> float:
        """The validation metric of the model on ``source`` (eval mode; the model stays in it):
        the ``metric_fn``'s, or the built-in ``config.stop_metric``."""
        return self._scores(source)[0]

    @torch.no_grad()
    def _scores(self, source: BatchSource) -> tuple[float, dict[str, float]]:
        """(the stopping metric, {"auc", "logloss"} with the built-in metrics or {} with a
        ``metric_fn``) of the model on ``source``, in eval mode."""
        if len(source) == 0:
            raise ValueError("the validation source is empty")
        self.model.eval()
        if self.metric_fn is not None:
            return float(self.metric_fn(self.model, source)), {}
        scores = click_scores(self.model, source, self.config.eval_batch_size)
        return scores[self.config.stop_metric.value], scores

    def _checked_scores(self, valid: BatchSource, when: str) -> tuple[float, dict[str, float]]:
        metric, scores = self._scores(valid)
        if math.isnan(metric):
            raise ValueError(
                f"the validation metric is NaN {when} (for AUC: does the validation source hold both labels?)"
            )
        return metric, scores

    def _improves(self, metric: float, best: float | None) -> bool:
        return improves(metric, best, self.metric_mode, self.config.min_improvement)

    # ---- model state and checkpoints ----------------------------------------------------------

    def latest_checkpoint(self) -> Path | None:
        """The checkpoint with the highest step in ``config.checkpoint_dir``, or None."""
        return latest_checkpoint(self.config.checkpoint_dir)

    def _save_checkpoint(self, run: RunState, best_state: dict | None, rows: int) -> None:
        save_checkpoint(
            self.config.checkpoint_dir, self.config, rows, run, self.model, self.trainable, best_state, self.optimizers
        )

    # ---- the loop ----------------------------------------------------------------------------

    def fit(self, train: BatchSource, valid: BatchSource | None = None, *, resume: bool = True) -> FitReport:
        """Train on ``train``; evaluate on ``valid`` after every epoch (early stopping, best
        weights restored). With ``resume`` and a checkpoint in ``config.checkpoint_dir``, continue
        from it. Leaves the model in eval mode."""
        config = self.config
        rows = len(train)
        if rows == 0:
            raise ValueError("the training source is empty")
        if valid is not None and len(valid) == 0:
            raise ValueError("the validation source is empty")
        steps_per_epoch = math.ceil(rows / config.batch_size)
        total_steps = config.epochs * steps_per_epoch
        schedule = LRSchedule(
            total_steps, warmup_steps_for(total_steps, config.warmup_fraction), config.schedule, config.min_lr_ratio
        )
        self._build_optimizers()
        run, best_state, initial_scores, initial_metric = RunState(), None, None, None
        last_epoch = config.epochs if config.stop_after_epochs is None else config.stop_after_epochs
        torch.manual_seed(config.seed)
        resumed = (
            resume_from(config.checkpoint_dir, config, rows, self.model, self.trainable, self.optimizers)
            if resume
            else None
        )
        if resumed is not None:
            _, run, best_state = resumed
        elif config.keep_initial and valid is not None:  # a fresh run: the starting weights are epoch -1
            run.best_metric, initial_scores = self._checked_scores(valid, "before training")
            run.best_epoch, initial_metric = -1, run.best_metric
            best_state = trainable_state(self.model, self.trainable)
        resumed_from, samples_before = run.global_step, run.samples
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            memory_at_start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        start, train_seconds = time.perf_counter(), 0.0
        bar = tqdm(
            total=config.epochs * rows,
            initial=min(run.samples, config.epochs * rows),
            desc=config.desc,
            unit="samples",
            disable=not config.progress,
            leave=False,
        )
        with bar:
            while run.epoch < last_epoch and not run.stopped_early:
                self.model.train()
                order = epoch_order(rows, config.seed, run.epoch)
                for step in range(run.step_in_epoch, steps_per_epoch):
                    index = order[step * config.batch_size : (step + 1) * config.batch_size]
                    tick = time.perf_counter()
                    batch = train.batch(index).to(self.device)
                    run.last_lr = config.lr * schedule(run.global_step)
                    run.last_loss = self._step(batch, run.last_lr, check_sparse=run.global_step == resumed_from)
                    train_seconds += time.perf_counter() - tick
                    run.step_in_epoch, run.global_step = step + 1, run.global_step + 1
                    run.samples += len(index)
                    run.loss_sum += run.last_loss * len(index)
                    run.loss_rows += len(index)
                    bar.update(len(index))
                    every = config.checkpoint_every_steps
                    if (
                        config.checkpoint_dir
                        and every
                        and run.global_step % every == 0
                        and run.step_in_epoch < steps_per_epoch
                    ):
                        self._save_checkpoint(run, best_state, rows)
                best_state = self._end_epoch(run, valid, best_state)
                last = run.history[-1]
                bar.set_postfix(
                    epoch=last["epoch"],
                    loss=f"{last['train_loss']:.4f}",
                    valid=None if last["valid_metric"] is None else f"{last['valid_metric']:.4f}",
                )
                if config.checkpoint_dir:
                    self._save_checkpoint(run, best_state, rows)
            if run.stopped_early or run.epoch < config.epochs:  # epochs left unrun: the bar ends full, at the work done
                bar.total = bar.n
                bar.refresh()
        if best_state is not None:
            load_trainable_state(self.model, self.trainable, best_state, "the best epoch's weights")
        best_scores = self._best_scores(run, valid, initial_scores)
        self.model.eval()
        seconds = time.perf_counter() - start
        return FitReport(
            epochs_run=len(run.history),
            steps=run.global_step,
            samples=run.samples,
            seconds=seconds,
            samples_per_second=(run.samples - samples_before) / max(train_seconds, 1e-9),
            final_loss=run.last_loss,
            best_metric=run.best_metric,
            best_epoch=run.best_epoch,
            stopped_early=run.stopped_early,
            history=[dict(h) for h in run.history],
            best_scores=best_scores,
            initial_metric=initial_metric,
            resumed_from_step=resumed_from,
            training_state_bytes=training_state_bytes(self.model, self.optimizers),
            peak_memory_bytes=(torch.cuda.max_memory_allocated(self.device) - memory_at_start) if cuda else None,
            device=describe_device(self.device),
        )

    def _end_epoch(self, run: RunState, valid: BatchSource | None, best_state: dict | None) -> dict | None:
        """Record the epoch in the history, evaluate, update the best weights and the patience
        counter, advance to the next epoch. Returns the best weights so far."""
        metric, scores = None, {}
        if valid is not None:
            metric, scores = self._checked_scores(valid, f"after epoch {run.epoch}")
            if self._improves(metric, run.best_metric):
                run.best_metric, run.best_epoch, run.bad_epochs = metric, run.epoch, 0
                best_state = trainable_state(self.model, self.trainable)
            else:
                run.bad_epochs += 1
                patience = self.config.early_stopping_patience
                run.stopped_early = patience is not None and run.bad_epochs >= patience
        run.history.append(
            {
                "epoch": run.epoch,
                "train_loss": run.loss_sum / max(run.loss_rows, 1),
                "valid_metric": metric,
                **self._score_columns(scores),
                "lr": run.last_lr,
            }
        )
        run.epoch, run.step_in_epoch, run.loss_sum, run.loss_rows = run.epoch + 1, 0, 0.0, 0
        return best_state

    def _score_columns(self, scores: dict[str, float]) -> dict[str, float | None]:
        """A history row's valid_auc and valid_logloss (None without a validation source); none
        with a ``metric_fn``."""
        if self.metric_fn is not None:
            return {}
        return {f"valid_{m.value}": scores.get(m.value) for m in StopMetric}

    def _best_scores(
        self, run: RunState, valid: BatchSource | None, initial: dict[str, float] | None
    ) -> dict[str, float] | None:
        """{"auc", "logloss"} of the kept weights (the model holds them now): the best epoch's
        history row, the starting weights' evaluation, or — for the starting weights of a resumed
        run, evaluated in an earlier call — one more evaluation. None with a ``metric_fn`` or
        without validation."""
        if self.metric_fn is not None or valid is None or run.best_epoch is None:
            return None
        if run.best_epoch >= 0:
            row = next(h for h in run.history if h["epoch"] == run.best_epoch)
            return {m.value: row.get(f"valid_{m.value}") for m in StopMetric}
        return initial if initial is not None else self._scores(valid)[1]
