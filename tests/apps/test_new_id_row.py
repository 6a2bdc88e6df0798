"""Pretraining with ``new_id_share`` trains every table's new-id (out-of-vocabulary) row, which
plain pretraining never touches: the row ids the base never saw map to."""

from __future__ import annotations

import torch

from recpeft.apps.workflow import prepare, pretrain
from recpeft.datasets import Schema, load_interactions
from recpeft.models.dlrm import build_click_model, table_name
from recpeft.train import TrainConfig

from click_logs import write_log

SCHEMA = Schema(user="uid", item="sku", label="clicked", segment="country", timestamp="ts", categorical=("cat",))
OPTIONS = {"embedding_dim": 8, "dense_arch": (8, 8), "over_arch": (8,)}


def _new_id_rows(model, data):
    tables = dict(model.named_parameters())
    return {
        f: tables[f"sparse_arch.embedding_bag_collection.embedding_bags.{table_name(f)}.weight"][n - 1].detach()
        for f, n in data.encoder.cardinalities.items()
    }


def test_only_pretraining_with_a_new_id_share_trains_the_new_id_rows(tmp_path):
    write_log(tmp_path / "log.csv", rows=800)
    data = prepare(load_interactions(tmp_path / "log.csv", SCHEMA), SCHEMA)
    config = TrainConfig(epochs=1, batch_size=128, seed=3, progress=False)
    torch.manual_seed(3)  # pretrain's own start: the same seed, then the same model
    start = _new_id_rows(build_click_model(data.encoder.cardinalities, 1, **OPTIONS), data)
    plain, _ = pretrain(data, model_options=OPTIONS, train_config=config, device="cpu")
    taught, _ = pretrain(data, model_options=OPTIONS, train_config=config, device="cpu", new_id_share=0.2)
    for feature, row in _new_id_rows(plain, data).items():
        assert torch.equal(row, start[feature]), feature  # never looked up: still its random start
    for feature, row in _new_id_rows(taught, data).items():
        assert not torch.equal(row, start[feature]), feature  # trained
