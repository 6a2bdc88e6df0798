"""Every CLI failure is one line `recpeft <cmd>: error: ...` naming what and where, whatever raised
it (a full disk, a safetensors or torch error, an unexpected bug); --debug shows the traceback.
And an undefined AUC is said in words, not printed as nan."""

import errno
import json
import resource
import signal
import subprocess
import sys

import pandas as pd
import pytest

from recpeft.cli import main

from click_logs import ROLES, one_line_error, pretrained, write_log


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return pretrained(tmp_path_factory.mktemp("errors"))


def _limit_file_size(limit):
    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_is_one_line_naming_the_output(made, tmp_path):
    """A real failing write (a file-size limit: safetensors' writer fails inside Rust)."""
    out = tmp_path / "base"
    argv = ["pretrain", str(made["log"]), *ROLES, "--out", str(out), "--epochs", "1", "--embedding-dim", "8"]
    result = subprocess.run(
        [sys.executable, "-m", "recpeft.cli", *argv],
        capture_output=True,
        text=True,
        preexec_fn=_limit_file_size(4096),  # the weights file is about 19 KB
        timeout=120,
    )
    lines = [line for line in result.stderr.splitlines() if "error" in line or "Traceback" in line]
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and "File too large" in lines[0], lines
    assert lines[0].startswith(f"recpeft pretrain: error: cannot write the base checkpoint to {out}: "), lines
    assert not out.exists()  # the folder the failed save made is not left behind, empty


def test_a_safetensors_write_error_is_one_line(made, capsys, monkeypatch, tmp_path):
    from safetensors import SafetensorError

    from recpeft.peft.model import PeftModel

    def full(self, *args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'
        )

    monkeypatch.setattr(PeftModel, "save_pretrained", full)
    out = tmp_path / "adapter"
    one_line_error([*made["finetune"], "--out", str(out)], capsys, f"cannot write the adapter to {out}: No space left")


def test_a_json_report_on_a_full_disk_names_the_file(made, capsys, monkeypatch, tmp_path):
    from recpeft.cli import commands

    def full(path, report):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(commands, "save_report", full)
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--json", str(report)]
    one_line_error(argv, capsys, f"cannot write the JSON report to {report}: No space left on device")


@pytest.mark.parametrize(
    "error, words",
    [
        (AttributeError("'NoneType' object has no attribute 'x'"), "AttributeError: 'NoneType' object has no"),
        (MemoryError(), "out of memory"),
        (AssertionError(), "AssertionError (run again with --debug for the traceback)"),
        (RuntimeError("line one\nline two"), "RuntimeError: line one line two"),
    ],
)
def test_any_exception_is_one_line_and_debug_shows_the_traceback(made, capsys, monkeypatch, error, words):
    from recpeft.cli import commands

    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(commands, "click_metrics", broken)  # after the inputs are read: nothing names them
    argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"])]
    one_line_error(argv, capsys, words)
    with pytest.raises(type(error)):
        main([*argv, "--debug"])


def test_an_interrupt_is_one_line(made, capsys, monkeypatch):
    from recpeft.cli import commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "load_base", interrupted)
    assert main(["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"])]) == 130
    assert capsys.readouterr().err == "recpeft evaluate: error: interrupted\n"


def test_a_bad_model_config_names_the_checkpoint(made, capsys, tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(made["base"], base)
    config = json.loads((base / "model_config.json").read_text())
    config["model"]["kind"] = "transformer"
    (base / "model_config.json").write_text(json.dumps(config))
    one_line_error(["evaluate", str(made["log"]), *ROLES, "--base", str(base)], capsys, f"base checkpoint {base}: kind")


def test_a_corrupt_gzip_criteo_file_names_the_file(tmp_path, capsys):
    data = tmp_path / "day_0.tsv.gz"
    data.write_bytes(b"not gzip at all")
    one_line_error(["pretrain", str(data), "--out", str(tmp_path / "b"), "--quiet"], capsys, f"{data}: ")


def test_a_zero_embedding_dim_names_the_flag(made, capsys, tmp_path):
    argv = ["pretrain", str(made["log"]), *ROLES, "--out", str(tmp_path / "b"), "--embedding-dim", "0"]
    one_line_error(argv, capsys, "--embedding-dim must be a positive integer, got 0")


def test_bench_with_a_missing_base_names_it(tmp_path, capsys):
    one_line_error(["bench", "--base", str(tmp_path / "nothing"), "--quiet"], capsys, "is not a base checkpoint")


def test_auc_of_one_label_is_said_in_words_and_recorded(capsys, tmp_path):
    log, base = tmp_path / "one_label.csv", tmp_path / "base"
    write_log(log, one_label_after="2025-03-10")
    pretrain = ["pretrain", str(log), *ROLES, "--out", str(base), "--epochs", "1", "--embedding-dim", "8"]
    assert main([*pretrain, "--test-start", "2025-03-10"]) == 0  # the cut evaluate and finetune must repeat
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(log), *ROLES, "--base", str(base), "--test-start", "2025-03-10"]
    assert main([*argv, "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "south: AUC undefined: the test rows hold only one label" in out and "nan" not in out
    rows = {r["segment"]: r for r in json.loads(report.read_text())["segments"]}
    labels = pd.read_csv(log).query("country == 'south' and ts >= '2025-03-10'")["clicked"]
    assert labels.nunique() == 1  # the independent reason
    assert rows["south"]["auc"] is None and rows["south"]["auc_undefined"].startswith("the test rows hold only one")
    assert 0 <= rows["north"]["auc"] <= 1 and "auc_undefined" not in rows["north"]
    # finetune says it too, for the base and the fine-tuned model
    fine = ["finetune", str(log), *ROLES, "--base", str(base), "--segment", "south", "--epochs", "1"]
    assert main([*fine, "--test-start", "2025-03-10", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "AUC undefined: the test rows hold only one label" in out and "base undefined → undefined" in out


def test_a_time_cut_with_no_rows_after_it_names_the_data(made, capsys, tmp_path):
    argv = ["pretrain", str(made["log"]), *ROLES, "--out", str(tmp_path / "b"), "--test-start", "2031-01-01"]
    one_line_error(argv, capsys, f"data {made['log']}: ", "empty test part")
