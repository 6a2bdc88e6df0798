"""Repeated holdouts: the splits partition the pool, the epoch rule read on a curve is the
Trainer's own choice on the same metrics, ``stop_after_epochs`` retraces the first epochs of the
full schedule, and the fit averages its holdouts' curves and trains the chosen epochs on the pool."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from recpeft.datasets.batch import TensorBatches
from recpeft.train import TrainConfig, Trainer, chosen_epoch, fit_with_repeated_holdouts, holdout_indices
from recpeft.train.repeated_holdout import mean_curve

ROWS, FEATURES = 96, 5


def regression_rows(seed: int) -> TensorBatches:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(ROWS, FEATURES, generator=g)
    labels = (x @ torch.randn(FEATURES, generator=g) + 0.3 * torch.randn(ROWS, generator=g) > 0).float()
    return TensorBatches(x, labels=labels)


def subset(rows: TensorBatches, index: torch.Tensor) -> TensorBatches:
    return TensorBatches(*(f[index] for f in rows.features), labels=rows.labels[index])


class Logistic(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.linear = nn.Linear(FEATURES, 1)

    def forward(self, x):
        return self.linear(x).squeeze(1)


def config(**overrides) -> TrainConfig:
    values = dict(epochs=6, batch_size=16, lr=0.05, early_stopping_patience=2, progress=False, seed=3)
    return TrainConfig(**{**values, **overrides})


@pytest.mark.parametrize("pool,valid,repeats", [(10, 3, 4), (97, 20, 3)])
def test_holdout_splits_partition_the_pool(pool, valid, repeats):
    splits = holdout_indices(pool, valid, repeats, seed=5)
    assert len(splits) == repeats
    for train, held in splits:
        assert len(held) == valid and len(train) == pool - valid
        assert sorted(torch.cat([train, held]).tolist()) == list(range(pool))
    assert len({tuple(held.tolist()) for _, held in splits}) == repeats  # each draw its own rows
    again = holdout_indices(pool, valid, repeats, seed=5)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(splits, again, strict=True))


def test_holdout_splits_keep_groups_whole():
    g = torch.Generator().manual_seed(11)
    groups = torch.randint(0, 25, (120,), generator=g) * 7  # ids need not be 0 … G − 1
    for train, held in holdout_indices(120, 30, 5, seed=2, groups=groups):
        assert sorted(torch.cat([train, held]).tolist()) == list(range(120))
        assert not set(groups[train].tolist()) & set(groups[held].tolist())  # no group split
        # whole groups until at least 30 rows: dropping any one would leave fewer than 30 rows
        assert len(held) >= 30
        held_groups = torch.unique(groups[held])
        assert any(len(held) - int((groups[held] == h).sum()) < 30 for h in held_groups)


def test_holdout_splits_refuse_a_pool_without_training_rows():
    with pytest.raises(ValueError, match="valid must leave training rows"):
        holdout_indices(5, 5, 2, seed=0)


def test_mean_curve_refuses_ragged_curves():
    assert mean_curve([[1.0, 3.0], [2.0, 5.0]]) == [1.5, 4.0]
    with pytest.raises(ValueError, match="differ in length"):
        mean_curve([[1.0, 2.0], [1.0]])


@pytest.mark.parametrize("trial", range(12))
def test_chosen_epoch_is_the_trainers_choice_on_the_same_metrics(trial):
    """A scripted metric_fn feeds the Trainer the curve [m(−1), m(0), …]; the epoch it keeps
    (its loop, its patience) must be the one the walk on the curve chooses."""
    rng = random.Random(trial)
    epochs = rng.randint(2, 8)
    curve = [round(rng.uniform(0.5, 0.7), 3) for _ in range(epochs + 1)]
    mode = rng.choice(["max", "min"])
    delta = rng.choice([0.0, 0.01, 0.03])
    patience = rng.choice([None, 1, 2, 3])
    keep = rng.choice([True, False])
    script = iter(curve if keep else curve[1:])
    trainer = Trainer(
        Logistic(),
        config(epochs=epochs, early_stopping_patience=patience, min_improvement=delta, keep_initial=keep),
        metric_fn=lambda model, source: next(script),
        metric_mode=mode,
        device="cpu",
    )
    report = trainer.fit(regression_rows(0), regression_rows(1))
    epoch, best = chosen_epoch(curve, mode=mode, min_improvement=delta, patience=patience, keep_initial=keep)
    assert epoch == report.best_epoch
    assert best == report.best_metric


def test_stop_after_epochs_retraces_the_full_schedule():
    """Weights after epoch 2 of a 6-epoch run (captured by the metric_fn) equal the weights of the
    same run stopped after 3 epochs, bit for bit; a 3-epoch schedule ends elsewhere."""
    rows, valid = regression_rows(0), regression_rows(1)
    snapshots = []

    def capture(model, source):
        snapshots.append(model.linear.weight.detach().clone())
        return 0.0

    full = Trainer(Logistic(), config(early_stopping_patience=None), metric_fn=capture, device="cpu")
    full.fit(rows, valid)
    stopped_model = Logistic()
    report = Trainer(stopped_model, config(early_stopping_patience=None, stop_after_epochs=3), device="cpu").fit(rows)
    assert report.epochs_run == 3
    assert torch.equal(stopped_model.linear.weight, snapshots[2])
    short_model = Logistic()
    Trainer(short_model, config(epochs=3, early_stopping_patience=None), device="cpu").fit(rows)
    assert not torch.equal(short_model.linear.weight, snapshots[2])


def test_stop_after_epochs_beyond_the_schedule_is_refused():
    with pytest.raises(ValueError, match="TrainConfig.stop_after_epochs must be at most epochs"):
        TrainConfig(epochs=3, stop_after_epochs=4)


def test_fit_averages_the_holdouts_and_trains_the_chosen_epochs_on_the_pool():
    rows = regression_rows(2)
    settings = config(keep_initial=True, min_improvement=0.0)
    model, report = fit_with_repeated_holdouts(
        Logistic,
        lambda index: subset(rows, index),
        lambda index: subset(rows, index),
        ROWS,
        24,
        3,
        settings,
    )
    # each curve is an independent Trainer run on its split: the starting AUC, then every epoch's
    expected_curves = []
    for train, held in holdout_indices(ROWS, 24, 3, settings.seed):
        single = Trainer(Logistic(), config(keep_initial=True, early_stopping_patience=None), device="cpu")
        fitted = single.fit(subset(rows, train), subset(rows, held))
        expected_curves.append([fitted.initial_metric] + [h["valid_metric"] for h in fitted.history])
    assert report.curves == expected_curves
    assert all(len(c) == settings.epochs + 1 for c in report.curves)
    mean = [sum(v) / 3 for v in zip(*expected_curves, strict=True)]
    assert report.mean == pytest.approx(mean, rel=1e-12)
    epoch, best = chosen_epoch(mean, mode="max", min_improvement=0.0, patience=2, keep_initial=True)
    assert (report.best_epoch, report.epochs) == (epoch, epoch + 1)
    assert report.epochs >= 1  # a learnable task: some epoch beats the starting weights
    reference = Logistic()
    Trainer(reference, config(stop_after_epochs=report.epochs), device="cpu").fit(rows)
    assert torch.equal(model.linear.weight, reference.linear.weight)
    assert not torch.equal(model.linear.weight, Logistic().linear.weight)


def test_fit_keeps_the_starting_weights_when_no_epoch_beats_them():
    """A metric that falls as the weights move away from the start: e* = −1, no training."""
    start = Logistic().linear.weight.detach().clone()

    def closeness(model, source):
        return -float((model.linear.weight - start).norm())

    rows = regression_rows(3)
    model, report = fit_with_repeated_holdouts(
        Logistic,
        lambda index: subset(rows, index),
        lambda index: subset(rows, index),
        ROWS,
        20,
        2,
        config(keep_initial=True),
        metric_fn=closeness,
    )
    assert (report.best_epoch, report.epochs) == (-1, 0)
    assert report.best_metric == 0.0
    assert all(c[0] == 0.0 and max(c[1:]) < 0.0 for c in report.curves)
    assert torch.equal(model.linear.weight, start)
