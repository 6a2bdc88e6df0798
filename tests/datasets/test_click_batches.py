"""ClickBatches: KeyedJaggedTensor batches, routing and subsets against the encoded frame."""

import numpy as np
import pandas as pd
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from recpeft.datasets import ClickBatches, FeatureEncoder, Schema, load_interactions
from recpeft.datasets.batch import BatchSource

SCHEMA = Schema(segment="market", timestamp=None, categorical=("brand",), dense=("price", "age"))


def encoded_log(seed: int, n: int = 300, schema: Schema = SCHEMA):
    rng = np.random.default_rng(seed)
    frame = load_interactions(
        pd.DataFrame(
            {
                "user": rng.integers(0, 50, n),
                "item": [f"i{k}" for k in rng.integers(0, 30, n)],
                "brand": rng.choice(["a", "b", "c", "d"], n),
                "price": rng.gamma(2.0, 10.0, n),
                "age": rng.integers(18, 70, n).astype(float),
                "label": rng.integers(0, 2, n),
                "market": rng.choice(["UK", "DE", "FR", "ES"], n),
            }
        ),
        schema,
    )
    encoder = FeatureEncoder().fit(frame, schema)
    return frame, encoder, encoder.transform(frame)


def test_batch_contents_equal_the_encoded_rows():
    frame, encoder, encoded = encoded_log(1)
    route = {"DE": 0, "FR": 2}
    source = ClickBatches(encoded, route=route)
    assert isinstance(source, BatchSource) and len(source) == len(frame)
    index = torch.randperm(len(frame))[:37]
    batch = source.batch(index)
    dense, kjt = batch.args
    assert dense.dtype == torch.float32 and dense.shape == (37, 2)
    assert torch.equal(dense, encoded.dense[index])
    assert kjt.keys() == ["user", "item", "brand"]
    for feature in kjt.keys():
        assert torch.equal(kjt[feature].values(), encoded.sparse[feature][index])
        assert kjt[feature].lengths().tolist() == [1] * 37
    items = encoder.vocabulary("item")
    assert [items[k] for k in kjt["item"].values().tolist()] == frame["item"].iloc[index.numpy()].tolist()
    assert torch.equal(batch.labels, torch.tensor(frame["label"].iloc[index.numpy()].to_numpy()))
    expected = [route.get(m, -1) for m in frame["market"].iloc[index.numpy()]]
    assert batch.kwargs["adapter_ids"].tolist() == expected and set(expected) == {0, 2, -1}


def test_kjt_feeds_a_torchrec_embedding_bag_collection():
    _, encoder, encoded = encoded_log(2)
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=n, feature_names=[f])
        for f, n in encoder.cardinalities.items()
    ]
    ebc = EmbeddingBagCollection(tables=tables)
    index = torch.randint(0, len(encoded), (16,))
    pooled = ebc(ClickBatches(encoded).batch(index).args[1]).to_dict()
    weights = {f"t_{f}": t.weight for f, t in zip(encoder.cardinalities, ebc.embedding_bags.values())}
    for feature in encoder.cardinalities:
        # one id per bag: the pooled value is that id's row
        assert torch.equal(pooled[feature], weights[f"t_{feature}"][encoded.sparse[feature][index]]), feature


def test_no_dense_no_route_and_subset():
    schema = Schema(segment="market", timestamp=None)
    frame, _, encoded = encoded_log(3, schema=schema)
    source = ClickBatches(encoded)
    batch = source.batch(torch.arange(10))
    assert batch.args[0].shape == (10, 1) and not batch.args[0].any() and batch.kwargs == {}
    routed = ClickBatches(encoded, route={"ES": 1, "UK": 0})
    spain = routed.subset("ES")
    rows = frame.index[frame["market"] == "ES"].tolist()
    assert spain.encoded.rows.tolist() == rows and len(spain) == len(rows)
    whole = spain.batch(torch.arange(len(spain)))
    assert whole.kwargs["adapter_ids"].tolist() == [1] * len(rows)
    assert torch.equal(whole.args[1]["user"].values(), encoded.sparse["user"][rows])
    mask = torch.tensor((frame["user"] < 10).to_numpy())
    assert routed.subset(mask).encoded.rows.tolist() == frame.index[frame["user"] < 10].tolist()


def test_errors():
    _, _, encoded = encoded_log(4)
    with pytest.raises(ValueError, match=r"unknown segment\(s\) \['IT'\]; known segments: \['DE', 'ES', 'FR', 'UK'\]"):
        ClickBatches(encoded, route={"IT": 0})
    with pytest.raises(ValueError, match="adapter indices ≥ 0"):
        ClickBatches(encoded, route={"DE": -2})
    with pytest.raises(ValueError, match="unknown segment 'IT'"):
        ClickBatches(encoded).subset("IT")
    with pytest.raises(ValueError, match="mask has shape"):
        ClickBatches(encoded).subset(torch.ones(3, dtype=torch.bool))
    encoded.labels = None
    with pytest.raises(ValueError, match="no labels"):
        ClickBatches(encoded)


def test_a_fixed_share_of_ids_is_fed_as_each_features_new_id_row():
    _, encoder, encoded = encoded_log(4, n=2000)
    new_ids = {f: n - 1 for f, n in encoder.cardinalities.items()}
    plain = ClickBatches(encoded)
    dropped = ClickBatches(encoded, new_id_share=0.3, new_ids=new_ids, seed=5)
    index = torch.arange(len(encoded))
    before = plain.batch(index).args[1].to_dict()
    after = dropped.batch(index).args[1].to_dict()
    again = dropped.batch(index).args[1].to_dict()
    replaced = 0
    for feature in encoded.sparse:
        old, new = before[feature].values(), after[feature].values()
        changed = old != new
        assert bool((new[changed] == new_ids[feature]).all())  # replaced ids are the new-id row
        assert torch.equal(new, again[feature].values())  # the same pairs every time (epochs, resume)
        replaced += int((new == new_ids[feature]).sum())
    pairs = len(encoded) * len(encoded.sparse)
    # Binomial(pairs, 0.3): 5 standard deviations either side (a hash that picks no pairs, or all, fails)
    assert abs(replaced - 0.3 * pairs) <= 5 * (pairs * 0.3 * 0.7) ** 0.5
    assert torch.equal(dropped.batch(index).labels, plain.batch(index).labels)
    with pytest.raises(ValueError, match="new_ids must give the new-id row of every feature"):
        ClickBatches(encoded, new_id_share=0.1, new_ids={})
