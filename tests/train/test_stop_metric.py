"""Early stopping on AUC or LogLoss (TrainConfig.stop_metric) with a minimum improvement
(TrainConfig.min_improvement), on a model whose validation scores follow a script, so that the
metrics of every epoch are known beforehand and checked against an independent computation."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from recpeft.datasets.batch import TensorBatches
from recpeft.train import TrainConfig, Trainer, bce_loss
from recpeft.train.config import StopMetric

SIDE = 16  # positives and negatives each; 256 pairs, so every AUC is an exact multiple of 1/256
#: logit scale per stage: the ranking gets better stage by stage while the scores get overconfident
SCALES = (0.5, 2.0, 4.0, 8.0, 16.0)


class ScriptedScores(nn.Module):
    """Row r scores ``script[k, r]`` at stage k (a buffer, so restoring the best epoch's weights
    restores the stage too); a trainable scalar that does not change the scores keeps the Trainer
    content. :func:`advancing_loss` moves the stage on, one stage per optimizer step."""

    def __init__(self, script: torch.Tensor):
        super().__init__()
        self.register_buffer("script", script)
        self.register_buffer("stage", torch.zeros((), dtype=torch.int64))
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        stage = int(self.stage.clamp(max=self.script.shape[0] - 1))
        return self.script[stage, rows] + 0 * self.w


def advancing_loss(model: ScriptedScores, batch) -> torch.Tensor:
    """One step per epoch (batch_size ≥ rows): after epoch e the model is at stage e + 1."""
    model.stage += 1
    return bce_loss(model, batch)


def improving_ranking(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(script float32 [5, 32], labels [32]). Negatives score j + ε, positives i + k + ½ + ε at
    stage k (i, j = 0…15, |ε| < 0.2), so stage k orders 136 + Σ_{m≤k} (16 − m) of the 256 pairs
    (AUC 136, 151, 165, 178, 190 / 256), in a random row order; the scores are centred and scaled
    by SCALES[k] / 8, which makes the confident mistakes of the later stages cost LogLoss."""
    g = torch.Generator().manual_seed(seed)
    jitter = (torch.rand(2 * SIDE, generator=g) - 0.5) * 0.4
    order = torch.randperm(2 * SIDE, generator=g)
    base = torch.cat([torch.arange(SIDE), torch.arange(SIDE)]).double() + jitter.double()
    labels = torch.cat([torch.ones(SIDE), torch.zeros(SIDE)])
    stages = []
    for k, scale in enumerate(SCALES):
        scores = base + (k + 0.5) * labels.double()
        stages.append((scores - scores.mean()) * scale / 8)
    return torch.stack(stages)[:, order].float(), labels[order]


def pair_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """AUC by counting every (positive, negative) pair, ties one half, in float64."""
    scores = scores.double()
    pos, neg = scores[labels == 1], scores[labels == 0]
    above = (pos[:, None] > neg[None, :]).double().sum() + 0.5 * (pos[:, None] == neg[None, :]).double().sum()
    return float(above / (pos.numel() * neg.numel()))


def reference_logloss(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """−mean(y·log σ(s) + (1 − y)·log σ(−s)) in float64."""
    s, y = logits.double(), labels.double()
    return float(-(y * nn.functional.logsigmoid(s) + (1 - y) * nn.functional.logsigmoid(-s)).mean())


# LogLoss tolerance: recpeft.metrics computes softplus(s) − y·s, the reference −log σ(±s), both in
# float64; with |s| ≤ 16 each term is off by a few ulps of 16 (≈ 1e-14 at most) and the mean of 32
# terms no more, so 1e-12 leaves a wide margin and still fails on any wrong formula (the stages'
# LogLosses differ by more than 0.05).
LOGLOSS_TOL = 1e-12


def run(script, labels, **settings):
    model = ScriptedScores(script)
    rows = TensorBatches(torch.arange(labels.numel()), labels=labels)
    config = TrainConfig(**{"progress": False, "batch_size": 64, "epochs": 4, "amp": False, **settings})
    report = Trainer(model, config, loss_fn=advancing_loss).fit(rows, rows)
    return model, report


@pytest.fixture(scope="module")
def scripted():
    script, labels = improving_ranking(seed=int(torch.randint(0, 10_000, ()).item()))
    aucs = [pair_auc(s, labels) for s in script]
    losses = [reference_logloss(s, labels) for s in script]
    # the construction: AUC rises and LogLoss worsens at every stage (after the first for LogLoss)
    assert [a * 256 for a in aucs] == [136, 151, 165, 178, 190]
    assert all(b > a for a, b in zip(losses, losses[1:])), losses
    return script, labels, aucs, losses


@pytest.mark.parametrize("stop", list(StopMetric))
def test_history_reports_both_metrics_whichever_stops(scripted, stop):
    script, labels, aucs, losses = scripted
    _, report = run(script, labels, stop_metric=stop.value, early_stopping_patience=None)
    assert report.epochs_run == 4
    for row in report.history:
        stage = row["epoch"] + 1
        assert row["valid_auc"] == aucs[stage]  # both exact multiples of 1/256
        assert row["valid_logloss"] == pytest.approx(losses[stage], abs=LOGLOSS_TOL)
        assert row["valid_metric"] == row[f"valid_{stop.value}"]


def test_auc_and_logloss_stop_and_keep_different_epochs(scripted):
    script, labels, aucs, losses = scripted
    by_auc, report = run(script, labels, stop_metric="auc", early_stopping_patience=2)
    assert not report.stopped_early and report.best_epoch == 3 and int(by_auc.stage) == 4
    assert report.best_metric == aucs[4] and report.best_scores["auc"] == aucs[4]
    by_loss, report = run(script, labels, stop_metric="logloss", early_stopping_patience=2)
    # epoch 0 has the lowest LogLoss; epochs 1 and 2 are worse: stop after them, keep epoch 0
    assert report.stopped_early and report.epochs_run == 3 and report.best_epoch == 0
    assert int(by_loss.stage) == 1 and report.best_metric == pytest.approx(losses[1], abs=LOGLOSS_TOL)
    assert report.best_scores == {"auc": aucs[1], "logloss": pytest.approx(losses[1], abs=LOGLOSS_TOL)}


@pytest.mark.parametrize("stop, best_epoch", [("auc", 3), ("logloss", -1)])
def test_keep_initial_with_either_metric(scripted, stop, best_epoch):
    script, labels, aucs, losses = scripted
    model, report = run(script, labels, stop_metric=stop, early_stopping_patience=2, keep_initial=True)
    assert report.best_epoch == best_epoch and int(model.stage) == best_epoch + 1
    stage = best_epoch + 1
    assert report.best_scores == {"auc": aucs[stage], "logloss": pytest.approx(losses[stage], abs=LOGLOSS_TOL)}
    if stop == "logloss":  # the starting weights beat every epoch: two bad epochs, then the start is restored
        assert report.stopped_early and report.epochs_run == 2


@pytest.mark.parametrize(
    "delta_pairs, best_epoch, stopped",
    [
        (0, 3, False),  # every gain counts
        (27, 0, True),  # epoch 1 gains 14 pairs, epoch 2 gains 27 over epoch 0: not *more* than 27
        (26, 2, False),  # epoch 2's 27 pairs beat 26: patience resets, epoch 3 (+12 over it) does not
    ],
)
def test_min_improvement_auc(scripted, delta_pairs, best_epoch, stopped):
    script, labels, aucs, _ = scripted
    model, report = run(script, labels, early_stopping_patience=2, min_improvement=delta_pairs / 256)
    assert (report.best_epoch, report.stopped_early, int(model.stage)) == (best_epoch, stopped, best_epoch + 1)
    assert report.best_metric == aucs[best_epoch + 1]


def test_min_improvement_logloss():
    """Scores in the right order, ever less underconfident: LogLoss falls each stage by less."""
    g = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    labels = (torch.rand(64, generator=g) < 0.5).float()
    labels[:2] = torch.tensor([0.0, 1.0])
    signal = (2 * labels - 1) + 0.8 * torch.randn(64, generator=g)
    script = torch.stack([signal * t for t in (0.10, 0.20, 0.25, 0.28, 0.30)]).float()
    losses = [reference_logloss(s, labels) for s in script]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses  # the construction: each stage better
    _, report = run(script, labels, stop_metric="logloss", early_stopping_patience=2)
    assert report.best_epoch == 3 and not report.stopped_early
    # δ just above epoch 2's gain over epoch 0: epochs 1 and 2 do not count, stop, keep epoch 0
    delta = (losses[1] - losses[3]) * 1.001
    model, report = run(script, labels, stop_metric="logloss", early_stopping_patience=2, min_improvement=delta)
    assert report.best_epoch == 0 and report.stopped_early and int(model.stage) == 1
    assert report.best_metric == pytest.approx(losses[1], abs=LOGLOSS_TOL)


@pytest.mark.parametrize(
    "field, value",
    [
        ("stop_metric", "ndcg"),
        ("stop_metric", 1),
        ("stop_metric", None),
        ("min_improvement", -0.01),
        ("min_improvement", math.nan),
        ("min_improvement", math.inf),
        ("min_improvement", "0.1"),
        ("min_improvement", True),
        ("min_improvement", None),
    ],
)
def test_bad_values_are_one_line_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}") as info:
        TrainConfig(**{field: value})
    assert "\n" not in str(info.value)
    text = json.dumps({**TrainConfig().to_dict(), field: value})
    with pytest.raises(ValueError, match=f"^ckpt.json: TrainConfig.{field}"):
        TrainConfig.from_json(text, source="ckpt.json")


def test_config_round_trips_and_trainer_refuses_contradictions():
    config = TrainConfig(stop_metric="logloss", min_improvement=0.002, progress=False)
    assert config.stop_metric is StopMetric.LOGLOSS and config.to_dict()["stop_metric"] == "logloss"
    assert TrainConfig.from_json(config.to_json()) == config
    model = ScriptedScores(torch.randn(2, 4))
    with pytest.raises(ValueError, match="metric_mode='max' contradicts TrainConfig.stop_metric='logloss'"):
        Trainer(model, config, metric_mode="max")
    with pytest.raises(ValueError, match="TrainConfig.stop_metric='logloss' picks a built-in metric"):
        Trainer(model, config, metric_fn=lambda m, s: 0.5)
    assert Trainer(model, config, metric_mode="min").metric_mode == "min"
    assert Trainer(model, TrainConfig(progress=False), metric_fn=lambda m, s: 0.5).metric_mode == "max"
