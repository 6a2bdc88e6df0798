"""Outputs never destroy inputs: every writing subcommand refuses an existing output unless
--overwrite, refuses (even with --overwrite) an output equal to, inside or holding what it reads,
and finds an unwritable output before any training. Each refusal leaves every input byte for byte
as it was (a sha256 of every file under the inputs, before and after)."""

import hashlib
import json
import os
import shutil

import pytest

from recpeft.cli import main
from recpeft.utils.outputs import OutputError, prepare_output

from click_logs import ROLES, one_line_error, pretrained


def digest(*paths) -> dict:
    """sha256 of every file under ``paths`` (folders walked), keyed by path."""
    out = {}
    for path in paths:
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for file in files:
            out[str(file)] = hashlib.sha256(file.read_bytes()).hexdigest()
    assert out, f"nothing to hash under {paths}"
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A CSV log, a base pretrained on it and a LoRA adapter fine-tuned on it (through the CLI)."""
    return pretrained(tmp_path_factory.mktemp("outputs"))


@pytest.fixture
def no_training(monkeypatch):
    """Any training fails loudly: a refusal must come before it."""
    from recpeft.train.trainer import Trainer

    def fit(*args, **kwargs):
        raise AssertionError("training started before the output was checked")

    monkeypatch.setattr(Trainer, "fit", fit)


def test_finetune_refuses_an_existing_adapter_unless_overwrite(made, capsys):
    before = digest(made["adapter"], made["base"], made["log"])
    argv = [*made["finetune"], "--out", str(made["adapter"])]
    one_line_error(argv, capsys, "already exists and is not empty; pass --overwrite")
    assert digest(made["adapter"], made["base"], made["log"]) == before
    # with --overwrite the adapter is replaced (another seed: other weights), the inputs are not
    assert main([*argv, "--overwrite", "--seed", "7"]) == 0
    after = digest(made["adapter"], made["base"], made["log"])
    weights = str(made["adapter"] / "adapter_model.safetensors")
    assert after[weights] != before[weights]
    assert {k: v for k, v in after.items() if "adapter" not in k} == {
        k: v for k, v in before.items() if "adapter" not in k
    }


@pytest.mark.parametrize("name", ["model.safetensors", "report.json"])
def test_evaluate_json_inside_the_base_is_refused_even_with_overwrite(made, capsys, no_training, name):
    before = digest(made["base"])
    target = made["base"] / name
    for extra in ([], ["--overwrite"]):
        argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--json", str(target), *extra]
        one_line_error(argv, capsys, f"is inside {made['base']}, which this command reads")
    assert digest(made["base"]) == before and not (made["base"] / "report.json").exists()


def test_evaluate_json_into_the_adapter_or_onto_the_data_is_refused(made, capsys):
    before = digest(made["adapter"], made["log"])
    common = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--adapter", str(made["adapter"])]
    one_line_error(
        [*common, "--json", str(made["adapter"] / "adapter_config.json"), "--overwrite"], capsys, "is inside"
    )
    one_line_error(
        [*common, "--json", str(made["log"]), "--overwrite"], capsys, f"is {made['log']}, which this command"
    )
    assert digest(made["adapter"], made["log"]) == before


def test_evaluate_json_replaces_a_file_only_with_overwrite(made, capsys):
    report = made["root"] / "eval.json"
    report.write_text("keep me\n")
    argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--json", str(report)]
    one_line_error(argv, capsys, "already exists; pass --overwrite")
    assert report.read_text() == "keep me\n"
    assert main([*argv, "--overwrite"]) == 0
    assert {s["segment"] for s in json.loads(report.read_text())["segments"]} == {"north", "south"}


@pytest.mark.parametrize("where", ["base", "inside", "holding"])
def test_merge_never_writes_over_what_it_reads(made, capsys, where):
    before = digest(made["base"], made["adapter"])
    out = {"base": made["base"], "inside": made["base"] / "merged", "holding": made["root"]}[where]
    relation = {"base": "is", "inside": "is inside", "holding": "holds"}[where]
    argv = ["merge", "--base", str(made["base"]), "--adapter", str(made["adapter"]), "--out", str(out), "--quiet"]
    one_line_error([*argv, "--overwrite"], capsys, f"{relation} ")
    assert digest(made["base"], made["adapter"]) == before and not (made["base"] / "merged").exists()


def test_dense_finetune_into_its_own_base_is_refused(made, capsys, no_training):
    before = digest(made["base"])
    argv = [*made["finetune"], "--method", "dense", "--out", str(made["base"]), "--overwrite"]
    one_line_error(argv, capsys, f"is {made['base']}, which this command reads")
    assert digest(made["base"]) == before


def test_pretrain_refuses_an_existing_base_and_its_own_data(made, capsys, no_training):
    before = digest(made["base"], made["log"])
    pretrain = ["pretrain", str(made["log"]), *ROLES, "--epochs", "1"]
    one_line_error([*pretrain, "--out", str(made["base"])], capsys, "already exists and is not empty")
    one_line_error([*pretrain, "--out", str(made["log"]), "--overwrite"], capsys, "which this command reads")
    assert digest(made["base"], made["log"]) == before


def test_pretrain_into_a_movielens_folder_it_reads_is_refused(tmp_path, capsys, no_training):
    data = tmp_path / "ml"
    data.mkdir()
    (data / "ratings.dat").write_text("1::1::5::978300760\n")
    before = digest(data)
    one_line_error(["pretrain", str(data), "--out", str(data / "base"), "--quiet"], capsys, f"is inside {data}")
    assert digest(data) == before and not (data / "base").exists()


def test_demo_refuses_a_non_empty_folder_before_any_work(tmp_path, capsys, no_training):
    (tmp_path / "notes.txt").write_text("mine\n")
    before = digest(tmp_path)
    one_line_error(["demo", "--out", str(tmp_path), "--quiet"], capsys, "pass --overwrite")
    assert digest(tmp_path) == before


def test_bench_json_inside_the_base_is_refused(made, capsys):
    before = digest(made["base"])
    argv = ["bench", "--base", str(made["base"]), "--json", str(made["base"] / "bench.json"), "--quiet"]
    one_line_error([*argv, "--overwrite"], capsys, "is inside")
    assert digest(made["base"]) == before


def test_an_output_under_a_file_is_found_before_training(made, capsys, no_training):
    blocker = made["root"] / "a_file"
    blocker.write_text("x")
    one_line_error([*made["finetune"], "--out", str(blocker / "deep" / "adapter")], capsys, f"{blocker} is a file")
    one_line_error([*made["finetune"], "--out", str(blocker), "--overwrite"], capsys, "is a file, not a folder")


def test_an_unwritable_output_is_found_before_training(made, capsys, no_training, monkeypatch):
    """The probe file in the nearest existing folder fails (as on a read-only mount)."""
    import tempfile

    def read_only(*args, **kwargs):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    one_line_error([*made["finetune"], "--out", str(made["root"] / "new" / "a")], capsys, "is not writable: ")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_found_before_training(made, capsys, no_training):
    locked = made["root"] / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        one_line_error([*made["finetune"], "--out", str(locked / "a")], capsys, "is not writable")
    finally:
        locked.chmod(0o700)


def test_prepare_output_rules(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_output(empty, reads=[base]) == empty  # an existing empty folder is fine
    assert prepare_output(tmp_path / "new" / "deeper", reads=[base]) == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # the guard creates nothing
    link = tmp_path / "link"
    link.symlink_to(base)
    with pytest.raises(OutputError, match="which this command reads"):
        prepare_output(link, reads=[base], overwrite=True)  # the same folder through a symlink
    with pytest.raises(OutputError, match="is a folder; name a file"):
        prepare_output(empty, kind="file", flag="--json")
    with pytest.raises(OutputError, match="--out is empty"):
        prepare_output("")
    assert prepare_output(base, overwrite=True) == base  # nothing read there: --overwrite allows it
    assert sorted(os.listdir(tmp_path)) == ["base", "empty", "link"]  # no probe files left behind
    shutil.rmtree(empty)
