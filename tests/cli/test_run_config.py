"""Settings from a file and back: ``--config run.toml`` for pretrain, finetune, evaluate and score
(keys are the flags, typed as the flags; the command line wins; unknown keys are one-line errors),
each run writing the settings it resolved as run.toml with its output, and a run repeated from
its run.toml reproducing its metrics exactly. And the flag spellings: ``--output`` (alias
``--out``), ``--lora-alpha`` and ``--target-modules`` (aliases ``--alpha``, ``--targets``)."""

import json
import math
import random

import pandas as pd
import pytest
import torch

from recpeft.apps.run_config import toml_text, tomllib
from recpeft.cli import main
from recpeft.cli.main import build_parser, parse_args
from recpeft.utils.integrity import read_safetensors

from click_logs import ROLES, one_line_error, write_log


def _toml(path, text: str):
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base pretrained from a config file (and one flag on the command line over it)."""
    root = tmp_path_factory.mktemp("config")
    log = root / "log.csv"
    write_log(log, isle_rows=20)
    config = _toml(
        root / "pretrain.toml",
        f'data = "{log}"\nuser = "uid"\nitem = "sku"\nlabel = "clicked"\nsegment_col = "country"\ntimestamp = "ts"\n'
        'categorical = ["cat"]\ndense = "price"\nexclude-segments = ["isle"]\nembedding-dim = 8\nepochs = 5\n'
        "lr = 0.002\ntest-start = 2025-03-10\nquiet = true\n",
    )
    assert main(["pretrain", "--config", str(config), "--epochs", "2", "--output", str(root / "base")]) == 0
    return {"root": root, "log": log, "base": root / "base"}


def test_a_config_gives_the_flags_and_the_command_line_wins(made):
    written = tomllib.loads((made["base"] / "run.toml").read_text())
    assert written["epochs"] == 2 and written["lr"] == 0.002  # the flag over the file; the file over the default
    assert written["exclude-segments"] == ["isle"] and written["embedding-dim"] == 8
    assert written["test-start"] == "2025-03-10" and written["categorical"] == "cat"
    assert written["batch-size"] == 1024 and written["seed"] == 0  # the defaults it ran with
    assert written["output"] == str(made["base"]) and "config" not in written and "quiet" not in written
    source = json.loads((made["base"] / "data_source.json").read_text())
    assert source["exclude_segments"] == ["isle"] and source["test_start"] == "2025-03-10"
    history = json.loads((made["base"] / "model_config.json").read_text())
    assert history["model"]["embedding_dim"] == 8


def test_repeating_a_pretraining_from_its_run_toml_reproduces_it(made):
    again = made["root"] / "again"
    assert main(["pretrain", "--config", str(made["base"] / "run.toml"), "--output", str(again), "--quiet"]) == 0
    first, second = (json.loads((p / "model_config.json").read_text())["metrics"] for p in (made["base"], again))
    assert first == second and math.isfinite(first["test_auc"])
    weights = [read_safetensors(p / "model.safetensors") for p in (made["base"], again)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    written = [tomllib.loads((p / "run.toml").read_text()) for p in (made["base"], again)]
    assert {**written[0], "output": None} == {**written[1], "output": None}


def _metrics(summary: dict) -> list:
    """What a fine-tuning summary measured (not its timings)."""
    keep = ("auc", "log_loss", "epochs", "best_epoch", "bytes", "train_loss", "valid_metric")
    rows = summary["segments"] + [summary["impression_weighted"]]
    cleaned = lambda row: {k: v for k, v in row.items() if any(k.endswith(x) for x in keep)}
    history = [[cleaned(h) for h in r.get(f"{m}_history", [])] for r in rows for m in ("lora", "dense")]
    return [cleaned(r) for r in rows] + history


def test_repeating_finetune_evaluate_and_score_from_their_run_toml(made, tmp_path):
    base, log = str(made["base"]), str(made["log"])
    first, second = tmp_path / "first", tmp_path / "second"
    config = _toml(
        tmp_path / "f.toml",
        'segments = ["north", "south"]\nmethod = "lora,dense"\nepochs = 2\nalpha = 6\nquiet = true\n',
    )
    assert main(["finetune", log, "--base", base, "--config", str(config), "--output", str(first)]) == 0
    written = tomllib.loads((first / "run.toml").read_text())
    assert written["lora-alpha"] == 6.0 and written["segments"] == "north,south" and written["base"] == base
    assert main(["finetune", "--config", str(first / "run.toml"), "--output", str(second)]) == 0
    summaries = [json.loads((p / "summary.json").read_text()) for p in (first, second)]
    assert _metrics(summaries[0]) == _metrics(summaries[1])
    assert all(math.isfinite(r["lora_auc"]) for r in summaries[0]["segments"])

    reports = [tmp_path / "e1.json", tmp_path / "e2.json"]
    argv = ["evaluate", log, "--base", base, "--adapters", str(first), "--quiet"]
    assert main([*argv, "--json", str(reports[0])]) == 0
    assert main(["evaluate", "--config", f"{reports[0]}.run.toml", "--json", str(reports[1])]) == 0
    results = [json.loads(p.read_text()) for p in reports]
    assert results[0]["segments"] == results[1]["segments"] and results[0]["settings"]["adapters"] == str(first)

    rows = tmp_path / "new.csv"
    pd.read_csv(made["log"]).drop(columns=["clicked"]).to_csv(rows, index=False)
    scores = [tmp_path / "s1.parquet", tmp_path / "s2.parquet"]
    argv = ["score", str(rows), "--base", base, "--adapters", str(first), "--chunk-rows", "700", "--quiet"]
    assert main([*argv, "--output", str(scores[0])]) == 0
    assert tomllib.loads((tmp_path / "s1.parquet.run.toml").read_text())["chunk-rows"] == 700
    assert main(["score", "--config", f"{scores[0]}.run.toml", "--output", str(scores[1])]) == 0
    pd.testing.assert_frame_equal(pd.read_parquet(scores[0]), pd.read_parquet(scores[1]))


def test_the_command_line_drops_the_files_other_half_of_an_either_or_pair(made, tmp_path):
    config = _toml(tmp_path / "c.toml", f'segments = "all"\nbase = "{made["base"]}"\noutput = "x"\n')
    args = parse_args(["finetune", str(made["log"]), "--config", str(config), "--segment", "north"])
    assert args.segment == "north" and args.segments is None and args.output == "x"
    assert parse_args(["finetune", "--config", str(config)]).segments == "all"


@pytest.mark.parametrize(
    "text, fragments",
    [
        ("epochs = 2\nbogus = 1\n", ["unknown key 'bogus'", "not a flag of `recpeft pretrain`"]),
        ("epochs = 2.5\n", ["epochs = 2.5", "a whole number"]),
        ("epochs = 2\nlr = \n", ["not valid TOML", "line 2"]),
        ('kind = "mlp"\n', ["kind = 'mlp'", "dlrm, dcn"]),
        ("quiet = 1\n", ["quiet = 1", "true or false"]),
        ('out = "a"\noutput = "b"\n', ["'out' and 'output' set the same flag"]),
        ('config = "other.toml"\n', ["unknown key 'config'"]),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key_and_the_file(made, capsys, tmp_path, text, fragments):
    config = _toml(tmp_path / "bad.toml", text)
    argv = ["pretrain", str(made["log"]), *ROLES, "--config", str(config), "--output", str(tmp_path / "b")]
    one_line_error(argv, capsys, f"--config {config}", *fragments)
    assert not (tmp_path / "b").exists()


def test_a_missing_config_and_an_either_or_pair_in_one_file(made, capsys, tmp_path):
    argv = ["finetune", str(made["log"]), "--base", str(made["base"]), "--output", str(tmp_path / "o")]
    one_line_error([*argv, "--config", str(tmp_path / "none.toml")], capsys, "none.toml: no such file")
    both = _toml(tmp_path / "both.toml", 'segment = "north"\nsegments = "all"\n')
    one_line_error([*argv, "--config", str(both)], capsys, "segment and segments exclude each other")


def test_toml_text_reads_back_as_written():
    rng = random.Random(13)
    floats = [rng.uniform(-1e6, 1e6) for _ in range(20)] + [rng.uniform(0, 1) * 10.0 ** rng.randint(-30, 30)]
    floats += [0.0, -0.0, 1e-05, float("inf"), 3.0]
    names = ['quo"te', "back\\slash", "tab\tnew\nline\x7f", "ünï €", "😀", "", "[not, a, list]"]
    settings = {f"f{i}": v for i, v in enumerate(floats)}
    settings.update({f"s{i}": v for i, v in enumerate(names)})
    settings.update({"yes": True, "no": False, "n": -(2**62), "names": names, "dashed-key_1": "x"})
    assert tomllib.loads(toml_text(settings, "recpeft test")) == settings


def test_output_lora_alpha_and_target_modules_keep_their_old_names_as_aliases():
    for argv in (["--output", "o"], ["--out", "o"]):
        assert parse_args(["pretrain", *argv]).output == "o"
    new = parse_args(["finetune", "--base", "b", "--segment", "s", "--out", "o", "--alpha", "3", "--targets", "a,b"])
    assert (new.lora_alpha, new.target_modules, new.output) == (3.0, "a,b", "o")
    subparsers = build_parser()._subparsers._group_actions[0].choices
    for name in ("demo", "pretrain", "finetune", "merge", "score"):
        text = subparsers[name].format_help()
        assert "--output OUTPUT (alias: --out)" in text and "--out OUTPUT" not in text, name
    text = subparsers["finetune"].format_help()
    assert "--lora-alpha LORA_ALPHA (alias: --alpha)" in text and "--target-modules NAMES (alias: --targets)" in text
