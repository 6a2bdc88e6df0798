"""``--target-modules auto`` (recpeft.apps.target_search): the probes it runs, the budget, the
choice by the validation metric (AUC higher, LogLoss lower is better), and the command line."""

import json

import pytest

from recpeft.apps.base_checkpoint import checkpoint_bytes
from recpeft.apps.run_config import tomllib
from recpeft.apps.target_search import NEW_ID_SETS, TARGET_SETS, Probe, chosen_config, search_targets, stage_two
from recpeft.cli import main
from recpeft.peft.config import LoraConfig
from recpeft.train import TrainConfig

from click_logs import ROLES, write_log

GROUPS = {"attributes": ["t_cat"], "ids": ["t_uid", "t_sku"], "dense_arch": ["d0", "d1"], "over_arch": ["o0", "o1"]}


def _scores(lora_config, train_config):
    """A made-up validation score: best with the over arch and the attribute table at r = 16, η = 1e-3."""
    targets = set(lora_config.target_modules)
    auc = 0.6 + 0.05 * ({"o0", "o1"} <= targets) + 0.03 * ("t_cat" in targets) - 0.02 * ("d0" in targets)
    auc += 0.01 * (lora_config.r == 16) - 0.01 * (train_config.lr > 5e-3)
    return {"auc": auc, "logloss": 1.0 - auc}


def test_the_search_probes_every_set_then_ranks_and_rates_around_the_best():
    calls = []

    def probe(lora_config, train_config):
        calls.append((tuple(lora_config.target_modules), lora_config.r, lora_config.lora_alpha, train_config))
        return _scores(lora_config, train_config)

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=[])
    config = TrainConfig(epochs=10, lr=3e-3, progress=False)
    best, ranking = search_targets(GROUPS, lora, config, probe)
    assert len(calls) == len(TARGET_SETS) + 4  # 9 one-epoch probes: ≤ 2x a 10-epoch fine-tune with the final one
    assert all(c[3].epochs == 1 for c in calls)
    assert all(c[2] == 2.0 * c[1] for c in calls)  # α scales with r: s = α/r stays 2
    assert (best.groups, best.r, best.lr) == (("attributes", "over_arch"), 16, 3e-3)
    assert [p.valid_auc for p in ranking] == sorted((p.valid_auc for p in ranking), reverse=True)
    second = calls[len(TARGET_SETS) :]
    expected = [(2, 3e-3), (16, 3e-3), (4, pytest.approx(1e-3)), (4, pytest.approx(9e-3))]
    assert [(c[1], c[3].lr) for c in second] == expected
    chosen = chosen_config(best, GROUPS, lora)
    assert chosen.target_modules == ["t_cat", "o0", "o1"] and chosen.r == 16 and chosen.lora_alpha == 32


def test_logloss_ranks_lower_first():
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=[])
    config = TrainConfig(epochs=10, lr=3e-3, stop_metric="logloss", progress=False)

    def probe(lora_config, train_config):
        s = _scores(lora_config, train_config)
        return {"auc": 1.0 - s["auc"], "logloss": s["logloss"]}  # AUC now says the opposite

    best, ranking = search_targets(GROUPS, lora, config, probe)
    assert best.groups == ("attributes", "over_arch")
    assert [p.valid_logloss for p in ranking] == sorted(p.valid_logloss for p in ranking)


def test_new_ids_are_one_more_candidate_whose_probes_alone_get_rows():
    calls = []

    def probe(lora_config, train_config):
        calls.append(lora_config)
        score = _scores(lora_config, train_config)
        return {k: v + 0.1 * bool(lora_config.new_rows) for k, v in score.items()}  # the new ids' rows help

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=[])
    best, ranking = search_targets(GROUPS, lora, TrainConfig(epochs=10, lr=3e-3, progress=False), probe,
                                   new_rows={"t_uid": 7})  # fmt: skip
    first = len(TARGET_SETS) + len(NEW_ID_SETS)
    assert len(calls) == first + 4
    with_rows = [c for c in calls[:first] if c.new_rows]
    assert len(with_rows) == 2 and all(c.new_rows == {"t_uid": 7} and c.new_id_row == -1 for c in with_rows)
    assert with_rows[0].target_modules == ["t_cat", "d0", "d1", "o0", "o1", "t_uid"]
    assert with_rows[1].target_modules == ["t_cat", "t_uid", "t_sku", "d0", "d1", "o0", "o1"]  # the id tables once
    assert best.groups in NEW_ID_SETS and all(c.new_rows for c in calls[first:])  # stage 2 keeps them
    chosen = chosen_config(best, GROUPS, lora, {"t_uid": 7})
    assert chosen.new_rows == {"t_uid": 7} and "t_uid" in chosen.target_modules
    assert chosen_config(ranking[-1], GROUPS, lora, {"t_uid": 7}).new_rows is None  # a set without them


def test_a_size_budget_ranks_probes_over_it_last():
    def probe(lora_config, train_config):
        size = 10_000 if "t_uid" in lora_config.target_modules else 1_000  # the id tables are large
        auc = 0.6 + 0.1 * ("t_uid" in lora_config.target_modules) + 0.01 * (lora_config.r == 16)
        return {"auc": auc, "logloss": 1.0 - auc, "bytes": size * lora_config.r // 4}

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=[])
    config = TrainConfig(epochs=10, lr=3e-3, progress=False)
    free, _ = search_targets(GROUPS, lora, config, probe)
    assert "ids" in free.groups and free.r == 16  # without a budget the large tables win
    best, ranking = search_targets(GROUPS, lora, config, probe, max_bytes=5_000)
    assert "ids" not in best.groups and best.bytes <= 5_000 and best.r == 16  # r=16 without them: 4,000 bytes
    fits = [p.bytes <= 5_000 for p in ranking]
    assert fits == sorted(fits, reverse=True)  # every probe within the budget before every one over it
    inside = [p.valid_auc for p in ranking if p.bytes <= 5_000]
    assert inside == sorted(inside, reverse=True)


def test_stage_two_ranks_stay_within_2_to_16():
    assert sorted({p.r for p in stage_two(Probe(("over_arch",), 16, 1e-3))}) == [8, 16]
    assert sorted({p.r for p in stage_two(Probe(("over_arch",), 2, 1e-3))}) == [2, 8]


def test_finetune_auto_saves_the_ranking_and_the_chosen_targets(tmp_path, capsys):
    log, base, adapter = tmp_path / "log.csv", tmp_path / "base", tmp_path / "adapter"
    write_log(log)
    assert main(["pretrain", str(log), *ROLES, "--output", str(base), "--epochs", "1", "--embedding-dim", "8"]) == 0
    argv = ["finetune", str(log), *ROLES, "--base", str(base), "--segment", "south", "--epochs", "2"]
    argv.append("--no-keep-initial")  # an adapter that trained: its file holds the rows its probe touched
    assert main([*argv, "--target-modules", "auto", "--output", str(adapter)]) == 0
    out = capsys.readouterr().out
    assert "--target-modules auto" in out and "valid AUC" in out
    search = json.loads((adapter / "target_search.json").read_text())
    assert search["segment"] == "south" and len(search["probes"]) == len(TARGET_SETS) + 4
    assert search["max_bytes"] == int(0.02 * checkpoint_bytes(base))  # the default --max-adapter-share
    size = (adapter / "adapter_model.safetensors").stat().st_size
    assert search["probes"][0]["bytes"] > 0 and all(p["within_budget"] == (p["bytes"] <= search["max_bytes"])
                                                    for p in search["probes"])  # fmt: skip
    assert abs(size - search["probes"][0]["bytes"]) <= 0.01 * size, (size, search["probes"][0])  # foretold
    best = search["probes"][0]
    aucs = [p["valid_auc"] for p in search["probes"]]
    assert aucs == sorted(aucs, reverse=True)
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert saved["r"] == best["r"]
    kinds = {"attributes": "sparse_arch", "ids": "sparse_arch", "dense_arch": "dense_arch", "over_arch": "over_arch"}
    wanted = {kinds[g] for g in best["targets"].split("+")}
    assert {name.split(".")[0] for name in saved["adapted_modules"]} == wanted
    assert tomllib.loads((adapter / "run.toml").read_text())["target-modules"] == "auto"
