"""AdapterBank: one base serving several segments' adapters. A mixed table is scored as each
row's own adapter merged into the base scores it; a bad folder is refused with its reason while
the others keep serving; adapters come and go without touching the others; memory is counted
per adapter; a table of one segment takes the single-adapter path."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from recpeft.apps.adapter_bank import AdapterBank, AdapterRefused
from recpeft.apps.base_checkpoint import load_base
from recpeft.cli import main
from recpeft.datasets import ClickBatches
from recpeft.peft.model import PeftModel
from recpeft.train.trainer import predict

from click_logs import ROLES, pretrained
from reference_math import assert_normwise_close

# Routed rows run the same float32 ops as the merged model up to the order of the LoRA terms and
# of W + s·B·A: a few roundings of values ≤ O(1) through a 2-layer MLP, after a sigmoid (which
# only shrinks differences). 2^-16 ≈ 1.5e-5 is 100× those; the base in place of an adapter fails.
REL = 2.0**-16


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A base, adapters of it for 'south' and 'north', and a 'south' adapter of another base."""
    made = pretrained(tmp_path_factory.mktemp("bank"))
    root, log = made["root"], str(made["log"])
    finetune = ["finetune", log, *ROLES, "--epochs", "1", "--no-keep-initial"]  # adapters that move off the base
    assert main([*finetune, "--base", str(made["base"]), "--segment", "north", "--out", str(root / "north")]) == 0
    pretrain = ["pretrain", log, *ROLES, "--epochs", "1", "--embedding-dim", "8", "--seed", "7"]
    assert main([*pretrain, "--out", str(root / "other_base")]) == 0
    assert (
        main([*finetune, "--base", str(root / "other_base"), "--segment", "south", "--out", str(root / "foreign")]) == 0
    )
    frame = pd.read_csv(log).sample(400, random_state=0).reset_index(drop=True)
    return {**made, "north": root / "north", "foreign": root / "foreign", "frame": frame}


def _merged_scores(made, folder, frame):
    """An independent path: ``folder``'s adapter (None: none) merged into the base, then predict."""
    base, encoder = load_base(made["base"])
    model = base if folder is None else PeftModel.from_pretrained(base, folder).merge_and_unload()
    return torch.sigmoid(predict(model, ClickBatches(encoder.transform(frame, unseen="oov"))))


def _rows(frame, segment):
    return torch.from_numpy((frame["country"] == segment).to_numpy().copy())


def test_a_mixed_table_scores_each_row_as_its_adapter_merged(made):
    bank = AdapterBank(made["base"], device="cpu")
    assert bank.add_folders({"south": made["adapter"]}) == {}  # north rows: the base alone
    frame = made["frame"]
    scores = bank.score(frame)
    assert scores.shape == (len(frame),)
    south, north = _rows(frame, "south"), _rows(frame, "north")
    assert_normwise_close(scores[south], _merged_scores(made, made["adapter"], frame[south.numpy()]), rel=REL)
    assert torch.equal(scores[north], _merged_scores(made, None, frame[north.numpy()]))  # the base's own ops
    with pytest.raises(AssertionError, match="exceeds"):  # the adapter matters
        assert_normwise_close(scores[south], _merged_scores(made, None, frame[south.numpy()]), rel=REL)


def test_a_bad_folder_is_refused_and_the_others_keep_serving(made, tmp_path):
    bank = AdapterBank(made["base"], device="cpu")
    missing = tmp_path / "nothing"
    refused = bank.add_folders({"south": made["foreign"], "north": made["north"], "east": missing})
    assert set(refused) == {"south", "east"} and bank.names == ("north",)
    assert "trained on another base" in refused["south"] and str(made["foreign"]) in refused["south"]
    assert str(missing) in refused["east"]
    frame = made["frame"]
    north = _rows(frame, "north")
    assert_normwise_close(bank.score(frame)[north], _merged_scores(made, made["north"], frame[north.numpy()]), rel=REL)
    with pytest.raises(AdapterRefused, match="already serving"):
        bank.add("north", made["north"])


def test_adapters_come_and_go_without_touching_the_others(made):
    bank = AdapterBank(made["base"], device="cpu")
    bank.add("north", made["north"])
    frame = made["frame"]
    north = _rows(frame, "north")
    before = bank.score(frame)
    bank.add("south", made["adapter"])
    assert_normwise_close(bank.score(frame)[north], before[north], rel=REL, name="north after adding south")
    bank.remove("south")
    assert bank.names == ("north",)
    assert torch.equal(bank.score(frame), before)  # exactly the one-adapter bank again
    with pytest.raises(KeyError, match="no adapter 'south'"):
        bank.remove("south")


def test_a_name_served_again_from_another_folder_scores_as_the_new_adapter(made):
    """Removing the last adapter and adding another under its name gives the same routed names
    as before: the layers' kept routed lists must still see the new adapter (the bank's
    generation changes on every add and remove)."""
    bank = AdapterBank(made["base"], device="cpu")
    bank.add_folders({"south": made["adapter"], "north": made["north"]})
    frame = made["frame"]
    north = _rows(frame, "north")
    before = bank.score(frame)  # routed lists kept for ("south", "north")
    bank.remove("north")
    bank.add("north", made["adapter"])  # ("south", "north") again, south's adapter behind "north"
    assert bank.names == ("south", "north")
    after = bank.score(frame)
    assert_normwise_close(after[north], _merged_scores(made, made["adapter"], frame[north.numpy()]), rel=REL)
    assert not torch.equal(after[north], before[north])


def test_memory_is_counted_per_adapter_and_one_segment_runs_unrouted(made, monkeypatch):
    bank = AdapterBank(made["base"], device="cpu")
    bank.add_folders({"south": made["adapter"], "north": made["north"]})
    memory = bank.memory_bytes()
    holders = bank._peft.adapter_holders().values()
    for name in ("south", "north"):
        expected = sum(
            p.numel() * p.element_size() for h in holders if h.has_adapter(name) for p in h.adapter_parameters(name)
        )
        assert memory[name] == expected > 0
    routed_calls = []
    forward = bank._peft.forward
    monkeypatch.setattr(
        bank._peft, "forward", lambda *a, **k: routed_calls.append("adapter_ids" in k) or forward(*a, **k)
    )
    south_only = made["frame"][made["frame"]["country"] == "south"]
    scores = bank.score(south_only)
    assert routed_calls and not any(routed_calls)  # one adapter: no routing
    assert_normwise_close(scores, _merged_scores(made, made["adapter"], south_only), rel=REL)
