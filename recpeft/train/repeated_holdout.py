"""Repeated holdouts: how long to fine-tune a segment too small for one validation slice to decide.

One validation slice of a few hundred rows decides badly: its AUC moves by about 0.01–0.02 from
one draw of rows to the next, so early stopping on it keeps epochs that happened to suit those
rows (validation up, test down) or stops a slow climb at the base. Here the segment's rows
before the split, the pool P (|P| = n), are split K times at random into n − m training rows and
m validation rows (m the size of the one slice the segment would have had; with groups, whole
baskets or sessions, so that no group is split between the two):

    m_k(e)   validation metric of holdout k after epoch e (e = −1: the starting weights),
             each holdout training the full schedule of E epochs, no early stopping;
    m̄(e)    = (1/K) Σ_k m_k(e), the mean curve;
    e*       the Trainer's rule read on m̄: walking e = −1, 0, 1, …, an epoch improves when it
             beats the best so far by more than δ (``min_improvement``; mode "max" or "min"), and
             ``early_stopping_patience`` epochs in a row without improving end the walk; e* is the
             last epoch that improved (−1 when none beat the starting weights, with
             ``keep_initial``).

The final model trains on all of P with the same schedule (E epochs of warmup + cosine), stopped
after e* + 1 epochs (``TrainConfig.stop_after_epochs``); e* = −1 keeps the starting weights. So
the choice averages K slices' noise, and the kept model has also learned from the validation
rows. Cost: K full schedules plus one partial one, against one schedule cut by early stopping.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from recpeft.datasets.batch import Batch, BatchSource
from recpeft.utils.validation import check_int

from .config import TrainConfig
from .trainer import Trainer, improves


def holdout_indices(
    pool: int, valid: int, repeats: int, seed: int, groups: torch.Tensor | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """K = ``repeats`` random splits of rows 0 … pool − 1 into (training rows, validation rows),
    each sorted; split k draws from a generator seeded (seed, k). Without ``groups``: ``valid``
    rows drawn uniformly. With ``groups`` [pool] (a basket, a session: rows that must stay
    together): whole groups in random order until they hold at least ``valid`` rows."""
    check_int("repeats", repeats)
    check_int("valid", valid)
    if valid >= pool:
        raise ValueError(f"valid must leave training rows: {valid} validation rows of a pool of {pool}")
    if groups is not None and groups.shape != (pool,):
        raise ValueError(f"groups must hold one group id per pool row [{pool}], got shape {tuple(groups.shape)}")
    splits = []
    for k in range(repeats):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
        if groups is None:
            order = torch.randperm(pool, generator=generator)
            held = torch.zeros(pool, dtype=torch.bool)
            held[order[:valid]] = True
        else:
            names, group_of = torch.unique(groups, return_inverse=True)
            sizes = torch.bincount(group_of, minlength=len(names))
            order = torch.randperm(len(names), generator=generator)
            taken = order[: int(torch.searchsorted(sizes[order].cumsum(0), valid)) + 1]
            held = torch.isin(group_of, taken)
            if held.all():
                raise ValueError(f"valid must leave training rows: the groups drawn for {valid} rows hold all {pool}")
        splits.append((torch.nonzero(~held).squeeze(1), torch.nonzero(held).squeeze(1)))
    return splits


def mean_curve(curves: list[list[float]]) -> list[float]:
    """m̄(e) = (1/K) Σ_k m_k(e) over K curves of one length."""
    if not curves:
        raise ValueError("no holdout curves to average")
    lengths = {len(c) for c in curves}
    if len(lengths) != 1:
        raise ValueError(f"holdout curves differ in length: {sorted(lengths)}")
    return [sum(values) / len(curves) for values in zip(*curves, strict=True)]


def chosen_epoch(
    curve: list[float], *, mode: str, min_improvement: float, patience: int | None, keep_initial: bool
) -> tuple[int, float]:
    """(e*, m̄(e*)) by the Trainer's rule on ``curve`` = [m̄(−1), m̄(0), m̄(1), …] (see the module
    docstring); without ``keep_initial`` the walk starts at epoch 0 and m̄(−1) is ignored."""
    best_epoch, best, bad = None, None, 0
    for epoch, metric in enumerate(curve, start=-1):
        if epoch == -1 and not keep_initial:
            continue
        if improves(metric, best, mode, min_improvement):
            best_epoch, best, bad = epoch, metric, 0
        else:
            bad += 1
            if patience is not None and bad >= patience:
                break
    if best_epoch is None:
        raise ValueError("the curve holds no epoch to choose")
    return best_epoch, best


@dataclass
class RepeatedHoldoutReport:
    """What :func:`fit_with_repeated_holdouts` did: ``curves`` (per holdout, [m_k(−1), m_k(0), …]),
    ``mean`` (m̄), ``best_epoch`` (e*), ``best_metric`` (m̄(e*)) and ``epochs`` (e* + 1, the
    final model's training epochs; 0 keeps the starting weights)."""

    curves: list[list[float]]
    mean: list[float]
    best_epoch: int
    best_metric: float
    epochs: int


def fit_with_repeated_holdouts(
    new_model: Callable[[], nn.Module],
    training_rows: Callable[[torch.Tensor], BatchSource],
    validation_rows: Callable[[torch.Tensor], BatchSource],
    pool: int,
    valid: int,
    repeats: int,
    config: TrainConfig,
    *,
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor] | None = None,
    metric_fn: Callable[[nn.Module, BatchSource], float] | None = None,
    metric_mode: str | None = None,
    groups: torch.Tensor | None = None,
    device: torch.device | str | None = "cpu",
) -> tuple[nn.Module, RepeatedHoldoutReport]:
    """Choose the epochs on ``repeats`` holdouts of the pool, then train on all of it (see the
    module docstring). ``new_model()`` returns a fresh model to train (the base with a new
    adapter, or a dense copy); ``training_rows(index)`` / ``validation_rows(index)`` the pool's
    rows ``index`` as a training / validation source. ``config`` is the one-slice run's:
    its ``epochs`` (E), ``early_stopping_patience``, ``min_improvement``, ``keep_initial`` and
    ``seed`` (holdout k draws its split from it) apply; none of these runs checkpoints.
    ``groups``: rows that are held out together (:func:`holdout_indices`).
    Returns (final model, report)."""
    check_int("repeats", repeats)
    holdout = dataclasses.replace(
        config, early_stopping_patience=None, keep_initial=True, stop_after_epochs=None, checkpoint_dir=None
    )
    curves, mode = [], "max"
    for k, (train_index, valid_index) in enumerate(holdout_indices(pool, valid, repeats, config.seed, groups)):
        trainer = Trainer(
            new_model(),
            dataclasses.replace(holdout, desc=f"{config.desc} holdout {k + 1}/{repeats}"),
            loss_fn=loss_fn,
            metric_fn=metric_fn,
            metric_mode=metric_mode,
            device=device,
        )
        mode = trainer.metric_mode
        report = trainer.fit(training_rows(train_index), validation_rows(valid_index), resume=False)
        curves.append([report.initial_metric] + [row["valid_metric"] for row in report.history])
    mean = mean_curve(curves)
    best_epoch, best_metric = chosen_epoch(
        mean,
        mode=mode,
        min_improvement=config.min_improvement,
        patience=config.early_stopping_patience,
        keep_initial=config.keep_initial,
    )
    model = new_model()
    if best_epoch >= 0:
        final = dataclasses.replace(config, stop_after_epochs=best_epoch + 1, keep_initial=False, checkpoint_dir=None)
        Trainer(model, final, loss_fn=loss_fn, device=device).fit(training_rows(torch.arange(pool)), resume=False)
    model.eval()
    return model, RepeatedHoldoutReport(curves, mean, best_epoch, best_metric, best_epoch + 1)
