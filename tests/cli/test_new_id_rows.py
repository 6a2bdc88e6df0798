"""New-id rows from the command line: ``finetune --new-id-rows uid`` gives each of a new segment's
customers (ids the base never saw) a LoRA row of its adapter's own; evaluate, score (routed, two
adapters whose new ids overlap) and merge use them. Every figure is checked against an
independent path: the adapter merged in Python, the ids worked out by hand from new_ids.json
(``click_logs.new_id_encoded``)."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft.apps.base_checkpoint import load_base
from recpeft.cli import main
from recpeft.metrics import auc, log_loss

from click_logs import ROLES, ROUTED_REL, merged_logits, metric_slacks, one_line_error, write_log
from reference_math import assert_normwise_close

CUT = "2025-03-10"
TABLE = "sparse_arch.embedding_bag_collection.t_uid"
UNSEEN = 99_999  # a customer no adapter has a row for


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A log whose 'south' customers are all new (uid + 10,000) and whose 300-row 'isle' holds
    some of them and some of north's; a base pretrained on north alone (with a new-id share), and
    south's and isle's LoRA adapters with new-id rows for uid."""
    root = tmp_path_factory.mktemp("new_ids")
    log, base, adapters = root / "log.csv", root / "base", root / "adapters"
    frame = write_log(log, new_in_south=("uid",), isle_rows=300)
    pretrain = ["pretrain", str(log), *ROLES, "--epochs", "1", "--embedding-dim", "8", "--test-start", CUT]
    pretrain += ["--exclude-segments", "south,isle", "--new-id-share", "0.1", "--output", str(base)]
    assert main(pretrain) == 0
    finetune = ["finetune", str(log), *ROLES, "--base", str(base), "--epochs", "2", "--no-keep-initial"]
    assert main([*finetune, "--segments", "south,isle", "--new-id-rows", "uid", "--output", str(adapters)]) == 0
    new = frame.drop(columns=["clicked", "ts"])
    new = pd.concat([new, new.head(5).assign(uid=UNSEEN)], ignore_index=True)  # customers nobody has seen
    new.to_csv(root / "new.csv", index=False)
    folders = {s: adapters / s for s in ("south", "isle")}
    return {"root": root, "log": log, "base": base, "adapters": adapters, "frame": frame, "new": new,
            "folders": folders, "finetune": finetune}  # fmt: skip


def _values(folder) -> list:
    return json.loads((folder / "new_ids.json").read_text())["values"]["uid"]


def test_finetune_gives_the_segments_new_customers_rows_of_their_own(made):
    frame, (_, encoder) = made["frame"], load_base(made["base"])
    known = set(encoder.vocabulary("uid"))
    for segment, folder in made["folders"].items():
        values = _values(folder)
        before_cut = frame[(frame["country"] == segment) & (frame["ts"] < pd.Timestamp(CUT))].sort_values("ts")
        assert values == sorted(set(values)) and not known & set(values), segment
        assert set(values) <= set(before_cut["uid"]) - known, segment  # the training rows' new customers ...
        surely_train = before_cut.head(int(0.8 * len(before_cut)))  # (the last 15% are validation rows)
        assert set(surely_train["uid"]) - known <= set(values), segment  # ... all of them
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["new_rows"] == {TABLE: len(values)} and TABLE in config["target_modules"], segment
    # the two adapters' ids name different customers: a mix-up would show
    south, isle = _values(made["folders"]["south"]), _values(made["folders"]["isle"])
    assert any(south.index(v) != j for j, v in enumerate(isle)), (south, isle)
    run = (made["adapters"] / "run.toml").read_text()
    assert 'new-id-rows = "uid"' in run  # the run remembers the flag


def test_evaluate_with_the_adapter_looks_new_customers_up_in_its_rows(made, tmp_path):
    report = tmp_path / "eval.json"
    folder = made["folders"]["south"]
    argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--adapter", str(folder)]
    assert main([*argv, "--segment", "south", "--json", str(report)]) == 0
    row = json.loads(report.read_text())["segments"][0]
    test = made["frame"][(made["frame"]["ts"] >= pd.Timestamp(CUT)) & (made["frame"]["country"] == "south")]
    labels = torch.tensor(test["clicked"].to_numpy(), dtype=torch.float32)
    own = merged_logits(made["base"], {"south": folder}, test.reset_index(drop=True))
    auc_slack, loss_slack = metric_slacks(own, labels)
    assert abs(row["auc"] - auc(own, labels)) <= auc_slack
    assert abs(row["log_loss"] - log_loss(own, labels)) <= loss_slack
    # the rows matter: every new customer at the new-id row scores otherwise
    at_new_id_row = merged_logits(made["base"], {"south": folder}, test.assign(uid=UNSEEN).reset_index(drop=True))
    assert abs(row["log_loss"] - log_loss(at_new_id_row, labels)) > loss_slack


def test_score_routes_each_rows_customers_to_its_own_adapters_rows(made, tmp_path):
    out = tmp_path / "scores.csv"
    argv = ["score", str(made["root"] / "new.csv"), "--base", str(made["base"]), "--adapters", str(made["adapters"])]
    assert main([*argv, "--output", str(out), "--chunk-rows", "256", "--quiet"]) == 0
    scores = pd.read_csv(out)
    reference = torch.sigmoid(merged_logits(made["base"], made["folders"], made["new"]))
    assert_normwise_close(torch.tensor(scores["score"].to_numpy()), reference, rel=ROUTED_REL)
    # routed in one pass by the bank of adapters (evaluate --adapters): the same ids
    report = tmp_path / "routed.json"
    argv = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--adapters", str(made["adapters"])]
    assert main([*argv, "--json", str(report)]) == 0
    rows = {r["segment"]: r for r in json.loads(report.read_text())["segments"]}
    test = made["frame"][made["frame"]["ts"] >= pd.Timestamp(CUT)].reset_index(drop=True)
    routed = merged_logits(made["base"], made["folders"], test)
    for segment in ("south", "isle"):
        mask = torch.from_numpy((test["country"] == segment).to_numpy(copy=True))
        labels = torch.tensor(test["clicked"].to_numpy()[mask.numpy()], dtype=torch.float32)
        _, loss_slack = metric_slacks(routed[mask], labels)
        assert abs(rows[segment]["adapted_log_loss"] - log_loss(routed[mask], labels)) <= loss_slack, segment


def test_merge_appends_the_new_customers_and_keeps_the_new_id_row_last(made, tmp_path, capsys):
    folder, merged_dir = made["folders"]["south"], tmp_path / "merged"
    assert main(["merge", "--base", str(made["base"]), "--adapter", str(folder), "--output", str(merged_dir)]) == 0
    (_, base_encoder), (merged, encoder) = load_base(made["base"]), load_base(merged_dir)
    values = _values(folder)
    assert encoder.vocabulary("uid") == base_encoder.vocabulary("uid") + values
    assert encoder.cardinalities["uid"] == base_encoder.cardinalities["uid"] + len(values)
    # the merged base scores every row (its customers now in the vocabulary, 99,999 at the new-id
    # row, the last) as the base with the adapter does
    out = tmp_path / "merged.csv"
    argv = ["score", str(made["root"] / "new.csv"), "--base", str(merged_dir), "--output", str(out), "--quiet"]
    assert main(argv) == 0
    everyone_south = made["new"].assign(country="south")
    reference = torch.sigmoid(merged_logits(made["base"], {"south": folder}, everyone_south))
    assert_normwise_close(torch.tensor(pd.read_csv(out)["score"].to_numpy()), reference, rel=ROUTED_REL)
    table = merged.sparse_arch.embedding_bag_collection.embedding_bags["t_uid"].weight
    base_table = load_base(made["base"])[0].sparse_arch.embedding_bag_collection.embedding_bags["t_uid"].weight
    assert table.shape[0] == encoder.cardinalities["uid"]
    assert not torch.equal(table[-1], table[base_encoder.cardinalities["uid"] - 1])  # a new customer's row moved up
    assert np.isfinite(table.detach().numpy()).all() and base_table.shape[0] < table.shape[0]


def test_bad_new_id_settings_and_files_are_refused_naming_them(made, capsys, tmp_path):
    finetune = [*made["finetune"], "--segment", "south", "--output", str(tmp_path / "a")]
    one_line_error([*finetune, "--new-id-rows", "uid,nope"], capsys, "--new-id-rows nope", "['uid', 'sku', 'cat']")
    joint = [*made["finetune"], "--segments", "south,isle", "--joint", "--new-id-rows", "uid"]
    one_line_error([*joint, "--output", str(tmp_path / "j")], capsys, "--joint", "--new-id-rows")
    one_line_error([*finetune, "--new-id-rows", "uid", "--method", "dense"], capsys, "--new-id-rows", "--method lora")
    # an adapter whose new_ids.json is lost, or names another count, is refused by every reader
    lost, other = tmp_path / "lost", tmp_path / "other"
    for copy in (lost, other):
        copy.mkdir()
        for file in made["folders"]["south"].iterdir():
            (copy / file.name).write_bytes(file.read_bytes())
    (lost / "new_ids.json").unlink()
    text = json.loads((other / "new_ids.json").read_text())
    text["values"]["uid"] = text["values"]["uid"][:-1]
    (other / "new_ids.json").write_text(json.dumps(text))
    evaluate = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--adapter"]
    one_line_error([*evaluate, str(lost)], capsys, str(lost), "no new_ids.json")
    one_line_error([*evaluate, str(other)], capsys, str(other / "new_ids.json"), "new_rows")
    merge = ["merge", "--base", str(made["base"]), "--output", str(tmp_path / "m"), "--adapter", str(lost)]
    one_line_error(merge, capsys, str(lost), "no new_ids.json")
    assert not (tmp_path / "m").exists()


def test_the_bank_serves_new_customers_and_refuses_a_broken_new_ids_file_alone(made, tmp_path):
    from recpeft.apps.adapter_bank import AdapterBank

    broken = tmp_path / "broken"
    broken.mkdir()
    for file in made["folders"]["isle"].iterdir():
        (broken / file.name).write_bytes(file.read_bytes())
    (broken / "new_ids.json").write_text('{"format": "recpeft.NewIds", "version": 1, "values": {"uid": [1]}}')
    bank = AdapterBank(made["base"], device="cpu")
    refused = bank.add_folders({**made["folders"], "north": broken})
    assert list(refused) == ["north"] and str(broken / "new_ids.json") in refused["north"]
    assert bank.names == ("south", "isle")
    scores = bank.score(made["new"])  # what `recpeft serve` answers POST /score with
    reference = torch.sigmoid(merged_logits(made["base"], made["folders"], made["new"]))
    assert_normwise_close(scores, reference, rel=ROUTED_REL)
    bank.remove("south")  # south's rows now get the base, its customers the new-id row
    reference = torch.sigmoid(merged_logits(made["base"], {"isle": made["folders"]["isle"]}, made["new"]))
    assert_normwise_close(bank.score(made["new"]), reference, rel=ROUTED_REL)


def test_auto_targets_try_the_new_customers_rows_as_one_more_candidate(made, tmp_path):
    out = tmp_path / "auto"
    argv = [*made["finetune"], "--segment", "south", "--new-id-rows", "uid", "--target-modules", "auto"]
    assert main([*argv, "--output", str(out)]) == 0
    probes = json.loads((out / "target_search.json").read_text())["probes"]
    assert "attributes+new_ids+dense_arch+over_arch" in [p["targets"] for p in probes]
    chosen = "new_ids" in probes[0]["targets"].split("+")
    config = json.loads((out / "adapter_config.json").read_text())
    assert (out / "new_ids.json").is_file() == chosen and bool(config["new_rows"]) == chosen
    if chosen:
        assert config["new_rows"] == {TABLE: len(_values(out))}
    evaluate = ["evaluate", str(made["log"]), *ROLES, "--base", str(made["base"]), "--adapter", str(out)]
    assert main([*evaluate, "--segment", "south"]) == 0
