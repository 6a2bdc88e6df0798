"""The Trainer: schedules against their closed form, clipping with sparse gradients, early
stopping, bit-for-bit resume, reproducible seeds, memory accounting, errors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from recpeft import LoraConfig, get_peft_model
from recpeft.datasets.batch import TensorBatches
from recpeft.metrics import auc
from recpeft.train import (
    FitReport,
    TrainConfig,
    Trainer,
    build_optimizers,
    clip_grad_norm,
    epoch_order,
    predict,
    sparse_gradient_parameters,
    training_state_bytes,
)
from recpeft.train.lora_adamw import LoraAdamW
from recpeft.train.schedules import LRSchedule, Schedule, warmup_steps_for

from reference_math import abs_inputs, abs_twin, assert_bound_can_fail, assert_within_bound, gamma

USERS, ITEMS, DIM = 40, 30, 6


class DropoutClickModel(nn.Module):
    """user [B], item [B], dense [B, 3] → logit [B]; dropout between the MLP layers."""

    def __init__(self):
        super().__init__()
        self.user = nn.Embedding(USERS, DIM)
        self.item = nn.Embedding(ITEMS, DIM)
        self.mlp = nn.Sequential(nn.Linear(2 * DIM + 3, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 1))

    def forward(self, user, item, dense):
        return self.mlp(torch.cat([self.user(user), self.item(item), dense], dim=1)).squeeze(1)


def click_data(rows: int, seed: int) -> TensorBatches:
    """Clicks from a hidden logistic model of user/item affinity plus a dense term."""
    g = torch.Generator().manual_seed(seed)
    user, item = torch.randint(0, USERS, (rows,), generator=g), torch.randint(0, ITEMS, (rows,), generator=g)
    dense = torch.randn(rows, 3, generator=g)
    taste = torch.randn(USERS, generator=torch.Generator().manual_seed(99))
    appeal = torch.randn(ITEMS, generator=torch.Generator().manual_seed(98))
    logit = 2 * taste[user] * appeal[item] + 1.5 * dense[:, 0]
    labels = (torch.rand(rows, generator=g) < torch.sigmoid(logit)).float()
    return TensorBatches(user, item, dense, labels=labels)


def lora_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    base = DropoutClickModel()
    return get_peft_model(base, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.2, target_modules=["item", "mlp.0"]))


def dense_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return DropoutClickModel()


def quiet(**kwargs) -> TrainConfig:
    return TrainConfig(**{"progress": False, "batch_size": 32, **kwargs})


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ---- schedules --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(Schedule))
def test_schedule_matches_closed_form(kind):
    total, fraction, floor = 40, 0.1, 0.2
    warmup = warmup_steps_for(total, fraction)
    assert warmup == 4
    schedule = LRSchedule(total, warmup, kind, floor)
    for t in range(total + 3):
        if t < warmup:
            expected = (t + 1) / warmup
        elif kind is Schedule.CONSTANT:
            expected = 1.0
        else:
            expected = floor + (1 - floor) * (1 + math.cos(math.pi * min(1, (t - warmup) / (total - warmup)))) / 2
        assert schedule(t) == pytest.approx(expected, abs=1e-12)
    assert schedule(warmup - 1) == 1.0
    if kind is Schedule.COSINE:
        assert schedule(total) == pytest.approx(floor) and schedule(warmup + 18) == pytest.approx(0.6)


def test_trainer_applies_schedule_each_step():
    data = click_data(100, seed=3)
    config = quiet(
        epochs=2, lr=0.01, warmup_fraction=0.25, schedule="cosine", min_lr_ratio=0.1, early_stopping_patience=None
    )
    model = dense_model()
    seen = []

    def loss_fn(model, batch):
        seen.append([g["lr"] for o in trainer.optimizers for g in o.param_groups])
        return nn.functional.binary_cross_entropy_with_logits(model(*batch.args), batch.labels)

    trainer = Trainer(model, config, loss_fn=loss_fn)
    report = trainer.fit(data)
    total = 2 * math.ceil(100 / 32)
    assert report.steps == len(seen) == total
    for t, lrs in enumerate(seen):
        w = total // 4
        f = (t + 1) / w if t < w else 0.1 + 0.9 * (1 + math.cos(math.pi * (t - w) / (total - w))) / 2
        assert lrs == pytest.approx([0.01 * f] * len(lrs), rel=1e-12)
    assert report.history[-1]["lr"] == pytest.approx(seen[-1][0])


# ---- clipping -------------------------------------------------------------------------------


def _grads_with_sparse(seed: int):
    g = torch.Generator().manual_seed(seed)
    dense = nn.Parameter(torch.randn(5, 4, generator=g))
    table = nn.Parameter(torch.randn(12, 3, generator=g))
    dense.grad = torch.randn(5, 4, generator=g) * 3
    rows = torch.tensor([[1, 7, 1, 3]])  # row 1 twice: uncoalesced duplicates must be summed
    table.grad = torch.sparse_coo_tensor(rows, torch.randn(4, 3, generator=g) * 3, (12, 3), check_invariants=True)
    return dense, table


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
def test_clip_grad_norm_with_sparse_gradients(max_norm):
    dense, table = _grads_with_sparse(seed=5)
    before = [dense.grad.double().clone(), table.grad.to_dense().double()]
    expected_norm = math.sqrt(sum(float((g**2).sum()) for g in before))
    norm = clip_grad_norm([dense, table], max_norm)
    # float32 Σ g² over n elements (γ_n relative, no cancellation), √ (halves it, + u): γ_{n+2}
    n = sum(g.numel() for g in before)
    assert norm == pytest.approx(expected_norm, rel=gamma(n + 2), abs=0)
    after = [dense.grad.double(), table.grad.to_dense().double()]
    after_norm = math.sqrt(sum(float((g**2).sum()) for g in after))
    scale = min(1.0, max_norm / (expected_norm + 1e-6))
    assert after_norm <= max_norm + 1e-5
    for b, a in zip(before, after):  # g·coef: coef = max_norm/(norm + ε) off by γ_{n+2} + 2u, then one more rounding
        assert_within_bound(a, b * scale, (b * scale).abs(), n + 5, computed=1, name="clipped")
    assert table.grad.is_sparse


# ---- sparse parameters and optimizers -----------------------------------------------------


def test_sparse_parameters_go_to_lora_adamw():
    model = lora_model()
    optimizers = build_optimizers(model, lr=1e-3, weight_decay=0.01)
    sparse = {id(p) for p in sparse_gradient_parameters(model)}
    expected = {id(model.base_model.item.lora_A["default"])}
    assert sparse == expected
    kinds = {type(o): {id(p) for g in o.param_groups for p in g["params"]} for o in optimizers}
    assert all(g["lr"] == 1e-3 and g["weight_decay"] == 0.01 for o in optimizers for g in o.param_groups)
    assert kinds[LoraAdamW] == expected
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert kinds[torch.optim.AdamW] == trainable - expected
    dense = dense_model()
    dense.user.sparse = True
    assert {id(p) for p in sparse_gradient_parameters(dense)} == {id(dense.user.weight)}
    with pytest.raises(ValueError, match="lr must be"):
        build_optimizers(model, lr=0.0)
    frozen = dense_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizers(frozen, lr=1e-3)


# ---- training ---------------------------------------------------------------------------


def test_loss_decreases_and_auc_beats_chance():
    torch.set_num_threads(1)
    train, valid = click_data(1200, seed=1), click_data(400, seed=2)
    model = dense_model()
    config = quiet(epochs=6, batch_size=64, lr=0.02, early_stopping_patience=None)
    report = Trainer(model, config).fit(train, valid)
    losses = [h["train_loss"] for h in report.history]
    rate = float(train.labels.mean())
    constant_loss = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))  # best label-blind predictor
    assert losses[-1] < losses[0] and losses[-1] < constant_loss - 0.08
    assert report.best_metric > 0.7  # chance is 0.5; the dense term alone gives about 0.75
    scores = predict(model, valid)
    assert auc(scores, valid.labels) == pytest.approx(report.best_metric, abs=1e-12)
    assert isinstance(report, FitReport) and report.samples == 6 * 1200 and report.samples_per_second > 0
    assert report.peak_memory_bytes is None and report.training_state_bytes > 0


def test_seeds_reproducible():
    data = click_data(200, seed=4)
    runs = []
    for seed in (7, 7, 8):
        model = lora_model()
        Trainer(model, quiet(epochs=2, seed=seed)).fit(data)
        runs.append(params_of(model))
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])
    assert any(not torch.equal(runs[0][n], runs[2][n]) for n in runs[0])
    assert not torch.equal(epoch_order(50, 7, 0), epoch_order(50, 7, 1))
    assert torch.equal(epoch_order(50, 7, 1), epoch_order(50, 7, 1))


def test_early_stopping_restores_best_epoch():
    data, valid = click_data(100, seed=5), click_data(50, seed=6)
    sequence = [0.50, 0.70, 0.60, 0.65, 0.90, 0.95]
    snapshots = []

    def metric_fn(model, source):
        snapshots.append(params_of(model))
        return sequence[len(snapshots) - 1]

    model = dense_model()
    report = Trainer(model, quiet(epochs=6, early_stopping_patience=2), metric_fn=metric_fn).fit(data, valid)
    assert report.stopped_early and report.epochs_run == 4 and len(snapshots) == 4
    assert report.best_epoch == 1 and report.best_metric == 0.70
    final = params_of(model)
    assert all(torch.equal(final[n], snapshots[1][n]) for n in final)
    assert any(not torch.equal(final[n], snapshots[3][n]) for n in final)
    assert [h["valid_metric"] for h in report.history] == sequence[:4]


def test_min_mode_early_stopping():
    data, valid = click_data(64, seed=5), click_data(20, seed=6)
    values = iter([3.0, 2.0, 2.5, 1.0])
    report = Trainer(
        dense_model(),
        quiet(epochs=4, early_stopping_patience=None),
        metric_fn=lambda m, s: next(values),
        metric_mode="min",
    ).fit(data, valid)
    assert report.best_metric == 1.0 and report.best_epoch == 3 and not report.stopped_early


class _Stop(Exception):
    pass


def _stopping_loss(after: int):
    calls = []

    def loss_fn(model, batch):
        if len(calls) == after:
            raise _Stop
        calls.append(1)
        return nn.functional.binary_cross_entropy_with_logits(model(*batch.args), batch.labels)

    return loss_fn


@pytest.mark.parametrize("make", [lora_model, dense_model], ids=["lora", "dense"])
@pytest.mark.parametrize("stop_after", [10, 8])
def test_resume_equals_uninterrupted_bit_for_bit(tmp_path, make, stop_after):
    torch.set_num_threads(1)
    train, valid = click_data(100, seed=8), click_data(60, seed=9)  # 4 steps of 32 rows per epoch
    settings = dict(
        epochs=4,
        checkpoint_every_steps=3,
        early_stopping_patience=1,
        clip_grad_norm=0.5,
        weight_decay=0.01,
        warmup_fraction=0.2,
    )
    whole = make()
    expected = Trainer(whole, quiet(checkpoint_dir=str(tmp_path / "whole"), **settings)).fit(train, valid)

    config = quiet(checkpoint_dir=str(tmp_path / "cut"), **settings)
    with pytest.raises(_Stop):
        Trainer(make(), config, loss_fn=_stopping_loss(stop_after)).fit(train, valid)
    saved = Trainer(make(), config).latest_checkpoint()
    assert saved is not None and saved.name == f"step-{(9 if stop_after == 10 else 8):09d}.pt"
    torch.manual_seed(12345)  # a different RNG state: the checkpoint must restore it
    resumed_model = make()
    resumed = Trainer(resumed_model, config).fit(train, valid)
    assert resumed.resumed_from_step == (9 if stop_after == 10 else 8)
    final, reference = params_of(resumed_model), params_of(whole)
    assert all(torch.equal(final[n], reference[n]) for n in reference)
    assert resumed.history == expected.history
    assert (resumed.steps, resumed.best_epoch, resumed.best_metric, resumed.final_loss, resumed.stopped_early) == (
        expected.steps,
        expected.best_epoch,
        expected.best_metric,
        expected.final_loss,
        expected.stopped_early,
    )
    assert torch.equal(predict(resumed_model, valid), predict(whole, valid))
    finished = make()
    again = Trainer(finished, config).fit(train, valid)  # resuming a finished run trains nothing
    assert again.steps == expected.steps and again.samples_per_second == 0
    assert all(torch.equal(p, reference[n]) for n, p in params_of(finished).items())


def test_resume_refuses_changed_config(tmp_path):
    data = click_data(64, seed=1)
    Trainer(dense_model(), quiet(epochs=1, checkpoint_dir=str(tmp_path))).fit(data)
    with pytest.raises(ValueError, match="lr="):
        Trainer(dense_model(), quiet(epochs=1, lr=0.5, checkpoint_dir=str(tmp_path))).fit(data)
    report = Trainer(dense_model(), quiet(epochs=1, lr=0.5, checkpoint_dir=str(tmp_path))).fit(data, resume=False)
    assert report.resumed_from_step == 0 and report.steps == 2


# ---- memory accounting, prediction, legacy call --------------------------------------------


def test_training_state_bytes_counts_params_grads_and_adam_state():
    model = nn.Sequential(nn.Embedding(20, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))
    model[0].weight.requires_grad_(True)
    dense_opt = torch.optim.AdamW(model[2].parameters(), lr=0.1, foreach=True)
    sparse_opt = LoraAdamW([model[0].weight], lr=0.1)
    ids = torch.tensor([[1, 2], [2, 5]])
    model(ids).sum().backward()
    dense_opt.step(), sparse_opt.step()
    f32 = 4
    params = (20 * 4 + 8 * 3 + 3) * f32
    grads = (8 * 3 + 3) * f32 + model[0].weight.grad._nnz() * (8 + 4 * f32)  # int64 index + row per entry
    adam = 2 * (8 * 3 + 3) * f32 + 2 * f32 + 2 * 20 * 4 * f32  # AdamW: exp_avg/sq + a float32 step per param;
    # LoraAdamW: exp_avg/sq (its step is an int)
    assert training_state_bytes(model, [dense_opt, sparse_opt]) == params + grads + adam


def test_predict_batches_a_source_in_row_order_and_refuses_a_bare_tuple():
    data = click_data(70, seed=2)
    model = dense_model().eval()
    with torch.no_grad():
        direct = model(*data.features)
        bound = abs_twin(model)(*abs_inputs(*data.features))  # reference_math.assert_within_bound
    # the same rows in batches of 16: the same ops, but BLAS may pick another kernel (another
    # summation order) for 16 rows than for 70; two layers of 2·DIM + 3 and 16 inputs, + biases
    n = 2 * DIM + 3 + 16 + 4
    assert_within_bound(predict(model, data, batch_size=16), direct, bound, n, name="predict")
    assert_bound_can_fail(direct, bound, n)
    with pytest.raises(TypeError, match="must be a BatchSource"):
        predict(model, data.features, 16)


# ---- configuration and errors ----------------------------------------------------------------


def test_config_json_round_trip():
    config = TrainConfig(
        epochs=5,
        lr=1e-3,
        schedule="constant",
        clip_grad_norm=None,
        checkpoint_dir="x",
        early_stopping_patience=None,
        desc="lora FR",
    )
    again = TrainConfig.from_json(config.to_json())
    assert again == config and again.schedule is Schedule.CONSTANT
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"epochz": 1})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 2.5}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"warmup_fraction": 1.5}, "warmup_fraction"),
        ({"schedule": "linear"}, "schedule"),
        ({"min_lr_ratio": -0.1}, "min_lr_ratio"),
        ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
        ({"early_stopping_patience": 0}, "early_stopping_patience"),
        ({"checkpoint_every_steps": 0}, "checkpoint_every_steps"),
        ({"amp": "yes"}, "amp"),
        ({"seed": -1}, "seed"),
        ({"keep_initial": 1}, "keep_initial"),
    ],
)
def test_bad_config_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        TrainConfig(**kwargs)


def test_errors():
    data = click_data(40, seed=1)
    frozen = dense_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        Trainer(frozen, quiet())
    empty = TensorBatches(
        torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, 3), labels=torch.zeros(0)
    )
    with pytest.raises(ValueError, match="training source is empty"):
        Trainer(dense_model(), quiet()).fit(empty)
    with pytest.raises(ValueError, match="validation source is empty"):
        Trainer(dense_model(), quiet()).fit(data, empty)
    with pytest.raises(ValueError, match="metric_mode"):
        Trainer(dense_model(), quiet(), metric_mode="best")
    with pytest.raises(ValueError, match="scalar tensor"):
        Trainer(dense_model(), quiet(), loss_fn=lambda model, batch: None).fit(data)
    with pytest.raises(ValueError, match="logits for a batch of"):
        Trainer(nn.Sequential(nn.Linear(3, 2)), quiet()).fit(TensorBatches(torch.randn(40, 3), labels=data.labels))
    one_class = TensorBatches(*data.features, labels=torch.ones(40))
    with pytest.raises(ValueError, match="NaN"):
        Trainer(dense_model(), quiet(epochs=1)).fit(data, one_class)


# ---- keep_initial ---------------------------------------------------------------------------


def test_keep_initial_restores_starting_weights_when_no_epoch_beats_them():
    data, valid = click_data(100, seed=5), click_data(50, seed=6)
    sequence = iter([0.80, 0.60, 0.70, 0.75])  # the start (epoch -1) is the best
    model = dense_model(seed=int(torch.randint(1000, ()).item()))
    start = params_of(model)
    report = Trainer(
        model, quiet(epochs=4, early_stopping_patience=2, keep_initial=True), metric_fn=lambda m, s: next(sequence)
    ).fit(data, valid)
    assert report.best_epoch == -1 and report.best_metric == 0.80 and report.stopped_early
    assert report.epochs_run == 2 and [h["valid_metric"] for h in report.history] == [0.60, 0.70]
    assert all(torch.equal(p, start[n]) for n, p in params_of(model).items())
    # without the option the same run keeps epoch 1, which changed the weights
    sequence = iter([0.60, 0.70, 0.65, 0.62])
    plain = dense_model(seed=3)
    start = params_of(plain)
    report = Trainer(plain, quiet(epochs=4, early_stopping_patience=2), metric_fn=lambda m, s: next(sequence)).fit(
        data, valid
    )
    assert report.best_epoch == 1 and any(not torch.equal(p, start[n]) for n, p in params_of(plain).items())


def test_keep_initial_yields_to_a_better_epoch_and_resumes_bit_for_bit(tmp_path):
    torch.set_num_threads(1)
    train, valid = click_data(100, seed=8), click_data(60, seed=9)
    settings = dict(epochs=3, checkpoint_every_steps=3, early_stopping_patience=2, keep_initial=True)
    calls = []

    def metric_fn(model, source):  # the real AUC, each call recorded
        calls.append(auc(predict(model, source), source.labels))
        return calls[-1]

    whole = lora_model()
    expected = Trainer(whole, quiet(checkpoint_dir=str(tmp_path / "whole"), **settings), metric_fn=metric_fn).fit(
        train, valid
    )
    assert len(calls) == 1 + expected.epochs_run  # the start, then every epoch
    assert expected.best_metric == max(calls)
    assert expected.best_epoch == calls.index(max(calls)) - 1
    config = quiet(checkpoint_dir=str(tmp_path / "cut"), **settings)
    with pytest.raises(_Stop):
        Trainer(lora_model(), config, loss_fn=_stopping_loss(5), metric_fn=metric_fn).fit(train, valid)
    calls.clear()
    resumed_model = lora_model()
    resumed = Trainer(resumed_model, config, metric_fn=metric_fn).fit(train, valid)
    assert len(calls) == expected.epochs_run - 1  # the start is not evaluated again
    assert (resumed.best_epoch, resumed.best_metric, resumed.history) == (
        expected.best_epoch,
        expected.best_metric,
        expected.history,
    )
    reference = params_of(whole)
    assert all(torch.equal(p, reference[n]) for n, p in params_of(resumed_model).items())
