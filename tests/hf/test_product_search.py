"""The product-search comparison runs end to end on MiniLM (a smoke run: 120 items, 3 steps):
every method reports ranking metrics over the whole catalogue, LoRA trains a small share and
leaves the encoder's weights alone, dense trains everything."""

from __future__ import annotations

import pytest
import torch

from recpeft.apps import product_search
from recpeft.models.text_tower import TextTwoTower


@pytest.fixture(scope="module")
def report(minilm_path):
    return product_search.run_product_search(steps=3, batch_size=16, max_items=120, encoder_path=minilm_path)


def test_every_method_reports_catalogue_ranking(report):
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["frozen", "lora", "dense"]
    assert report["data"]["items"] == 120 and report["data"]["test_clicks"] > 0
    for row in rows.values():
        assert 0.0 <= row["hr@10"] <= row["hr@50"] <= 1.0 and 0.0 <= row["ndcg@10"] <= 1.0
        assert row["samples_per_second"] > 0 and row["training_state_bytes"] > 0
    assert rows["frozen"]["trainable"] < rows["lora"]["trainable"] < rows["dense"]["trainable"]
    assert rows["lora"]["trainable_share"] < 0.05 and rows["dense"]["trainable_share"] == 1.0
    assert 0 < rows["lora"]["adapter_bytes"] < rows["dense"]["training_state_bytes"]


def test_lora_training_changes_the_adapter_not_the_encoder(fresh_minilm, minilm_path):
    encoder, tokenizer = product_search.load_minilm(minilm_path)
    frame = product_search.load_shop()
    train_clicks, _, titles = product_search.click_split(frame, max_items=60)
    tokens = product_search._tokens(tokenizer, titles)
    model = TextTwoTower(int(frame["user"].max()) + 1, encoder, dim=16)
    config = product_search.LoraConfig(r=4, target_modules=model.lora_targets(), modules_to_save=model.trained_whole())
    peft = product_search._trainable(model, "lora", config)
    frozen = {n: p.detach().clone() for n, p in peft.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in peft.named_parameters() if p.requires_grad}
    product_search.train(peft, tokens, train_clicks, steps=2, batch_size=8, lr=1e-2, seed=0, desc="lora")
    after = dict(peft.named_parameters())
    assert all(torch.equal(after[n], v) for n, v in frozen.items())  # MiniLM's own weights untouched
    assert any(not torch.equal(after[n], v) for n, v in trained.items() if "lora_B" in n)  # the adapter moved
