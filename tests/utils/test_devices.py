"""The device rule (recpeft.utils.devices) and its plumbing, on a CPU machine: auto picks CUDA
only where torch sees a GPU, a device this machine lacks is one error naming the flag before any
work, and the Trainer, the commands and their JSON say where they ran."""

from __future__ import annotations

import json

import pytest
import torch

from recpeft.cli import main
from recpeft.datasets.batch import Batch
from recpeft.utils.devices import describe_device, resolve_device, to_device

from click_logs import ROLES, write_log


def test_auto_is_cuda_only_where_torch_sees_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") == resolve_device(None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match=r"--device 'cuda:2': this machine has 1 CUDA GPU"):
        resolve_device("cuda:2", "--device")


@pytest.mark.parametrize(
    "spec, words",
    [("banana", "is not a device"), ("meta", "runs on cpu or cuda"), ("cuda", "has no CUDA GPU")],
)
def test_a_device_this_machine_lacks_is_one_error_naming_the_flag(monkeypatch, spec, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=f"--device '{spec}'.*{words}"):
        resolve_device(spec, "--device")


def test_cpu_moves_keep_the_values_and_describe_the_cpu():
    x = torch.randn(3, 2)
    assert to_device(x, torch.device("cpu")) is x  # nothing to copy
    batch = Batch((x, [1, 2]), torch.ones(3), {"ids": torch.arange(3)}).to("cpu")
    assert batch.args[0] is x and batch.args[1] == [1, 2] and torch.equal(batch.kwargs["ids"], torch.arange(3))
    assert describe_device(torch.device("cpu")) == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batches_reach_cuda_pinned_and_equal():
    x = torch.randn(64, 8)
    moved = Batch((x,), torch.ones(64)).to("cuda")
    torch.cuda.synchronize()
    assert moved.args[0].is_cuda and torch.equal(moved.args[0].cpu(), x)


def test_commands_stop_at_a_missing_gpu_and_record_the_device(tmp_path, capsys, monkeypatch):
    from recpeft.train.trainer import Trainer

    log = tmp_path / "log.csv"
    write_log(log, rows=600)
    pretrain = ["pretrain", str(log), *ROLES, "--epochs", "1", "--embedding-dim", "4"]
    fit = Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda *a, **k: pytest.fail("trained before the device was checked"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([*pretrain, "--out", str(tmp_path / "refused"), "--device", "cuda"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--device 'cuda': this machine has no CUDA GPU" in err, err
    assert not (tmp_path / "refused").exists()
    monkeypatch.setattr(Trainer, "fit", fit)
    assert main([*pretrain, "--out", str(tmp_path / "base"), "--device", "cpu"]) == 0
    assert "pretrained 1 epochs on cpu" in capsys.readouterr().out
    assert json.loads((tmp_path / "base" / "model_config.json").read_text())["metrics"]["device"] == "cpu"
    report = tmp_path / "eval.json"
    assert main(["evaluate", str(log), *ROLES, "--base", str(tmp_path / "base"), "--json", str(report)]) == 0
    assert json.loads(report.read_text())["device"] == "cpu"
