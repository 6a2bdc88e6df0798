"""What the command prints while it works: a training bar that early stopping ends full (at the
work done, not at 2 of 6 epochs' worth), and no torch.fx note ("is_fx_tracing will return true
...") in the middle of a table, with every other log record left alone."""

import logging
import subprocess
import sys

import pytest
from tqdm.auto import tqdm

from recpeft.cli import main
from recpeft.cli.main import FX_TRACING_NOTE, quiet_fx_tracing_note

from click_logs import ROLES, write_log

SHOWN = [a for a in ROLES if a != "--quiet"]  # bars on


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    path = tmp_path_factory.mktemp("progress") / "log.csv"
    write_log(path)
    return path


def _recording(monkeypatch) -> dict:
    """The trainer's bars, recorded: id → (label, count, total) when first closed."""
    closed = {}

    class Recording(tqdm):
        def close(self):
            if not self.disable:
                closed.setdefault(id(self), (self.desc, self.n, self.total))
            super().close()

    monkeypatch.setattr("recpeft.train.trainer.tqdm", Recording)
    return closed


def test_an_early_stopped_bar_ends_full_at_the_epochs_run(log, tmp_path, monkeypatch, capsys):
    closed = _recording(monkeypatch)
    # lr 1e-30 moves no float32 weight: the validation AUC never improves, so patience 1 stops
    # pretraining after its second epoch of the six asked for
    argv = ["pretrain", str(log), *SHOWN, "--epochs", "6", "--lr", "1e-30", "--embedding-dim", "4"]
    assert main([*argv, "--output", str(tmp_path / "base")]) == 0
    assert "pretrained 2 epochs" in capsys.readouterr().out
    ((desc, done, total),) = closed.values()
    assert desc == "pretrain" and done == total
    train_rows = done // 2
    assert done == 2 * train_rows and total < 6 * train_rows


def test_a_bar_that_runs_every_epoch_is_unchanged(log, tmp_path, monkeypatch):
    closed = _recording(monkeypatch)
    argv = ["pretrain", str(log), *SHOWN, "--epochs", "1", "--embedding-dim", "4", "--output", str(tmp_path / "b")]
    assert main(argv) == 0
    ((_, done, total),) = closed.values()
    assert done == total > 0


def test_the_fx_tracing_note_alone_is_dropped():
    from torch.fx import _symbolic_trace

    logger = logging.getLogger(FX_TRACING_NOTE[0])
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    # other tests (torchrec's set-up among them) may have raised this logger's level, disabled it
    # or disabled logging process-wide: undo that for the test, restore it after
    saved = (logger.level, logger.disabled, logging.root.manager.disable)
    logger.setLevel(logging.DEBUG)
    logger.disabled = False
    logging.disable(logging.NOTSET)
    logger.addHandler(handler)
    try:
        quiet_fx_tracing_note()
        quiet_fx_tracing_note()  # idempotent: one filter
        _symbolic_trace.is_fx_tracing_warning.__wrapped__()  # the note itself, past its once-a-process cache
        logger.warning("another note from torch.fx")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.disabled = saved[1]
        logging.disable(saved[2])
    assert seen == ["another note from torch.fx"]
    assert len(logger.filters) == 1


def test_no_fx_note_in_a_commands_output(log, tmp_path):
    """A fresh process, so the note's once-a-process cache cannot hide it."""
    argv = ["pretrain", str(log), *SHOWN, "--epochs", "1", "--embedding-dim", "4", "--output", str(tmp_path / "b")]
    result = subprocess.run([sys.executable, "-m", "recpeft.cli", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "pretrain: 100%" in result.stderr  # the bar did print
    assert "is_fx_tracing" not in result.stderr + result.stdout
