"""Resume when the newest training checkpoint is damaged: a truncated or corrupt newest file is
skipped for the previous one (kept for that purpose) with a warning naming it, and the resumed
run still ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch import nn

from recpeft.datasets.batch import TensorBatches
from recpeft.train import TrainConfig, Trainer
from recpeft.train.run_state import CheckpointFallbackWarning, checkpoints, read_checkpoint

USERS, ITEMS = 12, 9


class ClickModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.user, self.item = nn.Embedding(USERS, 4), nn.Embedding(ITEMS, 4)
        self.dense = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, user, item, dense):
        return self.out(self.user(user) * self.item(item) + self.dense(dense)).squeeze(-1)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return ClickModel()


def _data(rows: int, seed: int) -> TensorBatches:
    g = torch.Generator().manual_seed(seed)
    user, item = torch.randint(0, USERS, (rows,), generator=g), torch.randint(0, ITEMS, (rows,), generator=g)
    return TensorBatches(
        user, item, torch.randn(rows, 3, generator=g), labels=torch.randint(0, 2, (rows,), generator=g).float()
    )


def _config(folder) -> TrainConfig:
    return TrainConfig(progress=False, batch_size=32, epochs=3, checkpoint_every_steps=3, checkpoint_dir=str(folder))


class _Stop(Exception):
    pass


def _stopping_after(steps: int):
    calls = []

    def loss_fn(model, batch):
        if len(calls) == steps:
            raise _Stop
        calls.append(1)
        return nn.functional.binary_cross_entropy_with_logits(model(*batch.args), batch.labels)

    return loss_fn


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _interrupted(folder, train):
    """A run stopped after 10 steps: checkpoints of steps 8 (epoch end) and 9 remain."""
    with pytest.raises(_Stop):
        Trainer(_model(), _config(folder), loss_fn=_stopping_after(10)).fit(train)
    return checkpoints(folder)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _flip], ids=["truncated", "flipped byte"])
def test_damaged_latest_falls_back_to_previous(tmp_path, damage):
    torch.set_num_threads(1)
    train = _data(100, seed=3)  # 4 steps per epoch
    whole = _model()
    expected = Trainer(whole, _config(tmp_path / "whole")).fit(train)
    latest, previous = _interrupted(tmp_path / "cut", train)
    assert (latest.name, previous.name) == ("step-000000009.pt", "step-000000008.pt")
    damage(latest)
    resumed_model = _model()
    with pytest.warns(CheckpointFallbackWarning, match=rf"{latest}.*resuming from {previous}") as caught:
        resumed = Trainer(resumed_model, _config(tmp_path / "cut")).fit(train)
    assert len(str(caught[0].message).splitlines()) == 1
    assert resumed.resumed_from_step == 8
    reference = _params(whole)
    assert all(torch.equal(p, reference[n]) for n, p in _params(resumed_model).items())
    assert resumed.final_loss == expected.final_loss


def test_every_checkpoint_unreadable_is_an_error_naming_them(tmp_path):
    latest, previous = _interrupted(tmp_path, _data(100, seed=3))
    _truncate(latest)
    previous.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=rf"no readable checkpoint.*{latest.name}.*{previous.name}.*resume=False"):
        Trainer(_model(), _config(tmp_path)).fit(_data(100, seed=3))


def test_a_killed_writes_temporary_file_is_removed_by_the_next_save(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".step-000000003.pt.tmp-{dead.pid}-0badf00d"
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"half a checkpoint")
    Trainer(_model(), _config(tmp_path)).fit(_data(64, seed=1))
    assert not stale.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    assert len(checkpoints(tmp_path)) == 2


def test_a_checkpoint_of_the_older_layout_still_resumes(tmp_path):
    """Files written before the sha256 wrapper hold the bare payload: they are read unchecked."""
    train = _data(100, seed=3)
    latest, previous = _interrupted(tmp_path, train)
    torch.save(read_checkpoint(latest), latest)  # the bare payload, as older versions wrote it
    assert set(torch.load(latest, weights_only=True)) != {"sha256", "payload"}
    resumed = Trainer(_model(), _config(tmp_path)).fit(train)
    assert resumed.resumed_from_step == 9


@pytest.mark.parametrize("field", ["stop_metric", "min_improvement", "keep_initial"])
def test_a_checkpoint_from_before_a_config_field_resumes_at_its_default_and_ends_the_same(tmp_path, field):
    """A file whose config lacks a field added since ran at that field's default: it resumes
    (bit for bit where an uninterrupted run ends) under the default, and is refused under
    another value, naming the field."""
    torch.set_num_threads(1)
    train = _data(100, seed=3)
    whole = _model()
    Trainer(whole, _config(tmp_path / "whole")).fit(train)
    latest, previous = _interrupted(tmp_path / "cut", train)
    for path in (latest, previous):
        payload = read_checkpoint(path)
        del payload["config"][field]
        torch.save(payload, path)  # the bare payload, as an older release wrote it
    other = {"stop_metric": "logloss", "min_improvement": 0.5, "keep_initial": True}[field]
    changed = TrainConfig(**{**_config(tmp_path / "cut").to_dict(), field: other})
    with pytest.raises(ValueError, match=rf"{latest}.*{field}="):
        Trainer(_model(), changed).fit(train)
    resumed_model = _model()
    resumed = Trainer(resumed_model, _config(tmp_path / "cut")).fit(train)
    assert resumed.resumed_from_step == 9
    reference = _params(whole)
    assert all(torch.equal(p, reference[n]) for n, p in _params(resumed_model).items())
