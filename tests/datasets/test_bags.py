"""Bag features (``Schema.bags``: cells such as "Action|Comedy"): the schema's rule, the encoder's
padded id matrix, and ClickBatches' jagged KeyedJaggedTensor rows, against rows built here."""

import numpy as np
import pandas as pd
import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

from recpeft.datasets import ClickBatches, FeatureEncoder, Schema, load_interactions
from recpeft.datasets.encoding import PAD

SCHEMA = Schema(segment=None, timestamp=None, categorical=("brand", "tags"), bags=("tags",))
TAGS = ["red", "blue", "green", "small", "large", "sale"]


def tagged_log(seed: int, n: int = 400, tags=TAGS) -> pd.DataFrame:
    """Rows with a bag of 0–4 distinct tags each (some empty), in random order within the bag."""
    rng = np.random.default_rng(seed)
    bags = ["|".join(rng.choice(tags, size=int(rng.integers(0, 5)), replace=False)) for _ in range(n)]
    return load_interactions(
        pd.DataFrame(
            {
                "user": rng.integers(0, 40, n),
                "item": rng.integers(0, 25, n),
                "brand": rng.choice(["a", "b", "c"], n),
                "tags": bags,
                "label": rng.integers(0, 2, n),
            }
        ),
        SCHEMA,
    )


def expected_ids(cells, vocabulary) -> list[list[int]]:
    """Each cell's ids, in the cell's order: a vocabulary value's position, the last id for others."""
    return [[vocabulary.index(p) if p in vocabulary else len(vocabulary) for p in c.split("|") if p] for c in cells]


def unpadded(matrix: torch.Tensor) -> list[list[int]]:
    return [[v for v in row if v != PAD] for row in matrix.tolist()]


def test_schema_bags_rule_and_round_trip():
    assert Schema.from_dict(SCHEMA.to_dict()) == SCHEMA and SCHEMA.to_dict()["bags"] == ["tags"]
    plain = Schema(categorical=("brand",))
    assert "bags" not in plain.to_dict() and Schema.from_dict(plain.to_dict()) == plain
    assert SCHEMA.sparse_features == ("user", "item", "brand", "tags") and SCHEMA.columns.count("tags") == 1
    with pytest.raises(ValueError, match=r"Schema.bags must name categorical columns, each once; got \['tags'\]"):
        Schema(categorical=("brand",), bags=("tags",))
    with pytest.raises(ValueError, match="Schema.bags must be a sequence of column names"):
        Schema(categorical=("tags",), bags="tags")


def test_encoder_gives_each_row_its_bags_ids():
    frame = tagged_log(seed=int(torch.randint(0, 10_000, ()).item()))
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    vocabulary = encoder.vocabulary("tags")
    assert vocabulary == sorted({p for c in frame["tags"] for p in c.split("|") if p})
    assert encoder.cardinalities["tags"] == len(vocabulary) + 1
    encoded = encoder.transform(frame)
    ids = encoded.sparse["tags"]
    assert ids.dtype == torch.int64 and ids.shape == (len(frame), max(len(c.split("|")) for c in frame["tags"]))
    assert unpadded(ids) == expected_ids(frame["tags"], vocabulary)
    assert bool((ids[frame["tags"].to_numpy() == ""] == PAD).all())  # empty bags: padding only
    # padding only after the last id of a row
    assert bool(((ids[:, 1:] != PAD) <= (ids[:, :-1] != PAD)).all())
    again = FeatureEncoder.from_json(encoder.to_json()).transform(frame)
    assert torch.equal(again.sparse["tags"], ids) and again.schema == SCHEMA
    rows = torch.tensor([5, 1, 3])
    assert torch.equal(encoded.select(rows).sparse["tags"], ids[rows])


def test_unseen_bag_values_error_or_map_to_the_reserved_id():
    frame = tagged_log(seed=3, tags=TAGS[:4])
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    later = frame.iloc[:6].copy()
    later["tags"] = ["red|sale", "blue", "", "sale|large|red", "green", "red"]
    with pytest.raises(
        ValueError,
        match=r"column 'tags', index 0: value 'sale' \(of the bag 'red\|sale'\) was not "
        r"seen when the encoder was fitted \(2 such rows\)",
    ):
        encoder.transform(later)
    ids = encoder.transform(later, unseen="oov").sparse["tags"]
    assert unpadded(ids) == expected_ids(later["tags"], encoder.vocabulary("tags"))


def test_integer_bag_values_sort_as_numbers():
    schema = Schema(segment=None, timestamp=None, categorical=("codes",), bags=("codes",))
    frame = load_interactions(
        pd.DataFrame({"user": [1, 2, 3], "item": [1, 1, 2], "codes": ["12|3", "7", "3|100"], "label": [0, 1, 0]}),
        schema,
    )
    encoder = FeatureEncoder().fit(frame, schema)
    assert encoder.vocabulary("codes") == [3, 7, 12, 100]
    assert unpadded(encoder.transform(frame).sparse["codes"]) == [[2, 0], [1], [0, 3]]


def test_click_batches_feed_each_bag_as_one_jagged_row():
    frame = tagged_log(seed=int(torch.randint(0, 10_000, ()).item()))
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    encoded = encoder.transform(frame)
    index = torch.randperm(len(frame))[:50]
    kjt = ClickBatches(encoded).batch(index).args[1]
    assert kjt.keys() == ["user", "item", "brand", "tags"]
    bags = expected_ids(frame["tags"].iloc[index.numpy()], encoder.vocabulary("tags"))
    assert kjt["tags"].lengths().tolist() == [len(b) for b in bags]
    assert kjt["tags"].values().tolist() == [v for b in bags for v in b]
    assert torch.equal(kjt["brand"].values(), encoded.sparse["brand"][index])
    assert kjt["brand"].lengths().tolist() == [1] * 50
    tables = [
        EmbeddingBagConfig(name=f"t_{f}", embedding_dim=3, num_embeddings=n, feature_names=[f])
        for f, n in encoder.cardinalities.items()
    ]
    ebc = EmbeddingBagCollection(tables=tables)
    pooled = ebc(kjt).to_dict()["tags"].double()
    weight = ebc.embedding_bags["t_tags"].weight.double()
    for row, bag in zip(pooled, bags):
        # a float32 sum of k rows is within k·2⁻²⁴·Σ|row| of the exact sum; an empty bag pools to 0
        exact = weight[bag].sum(0) if bag else torch.zeros(3, dtype=torch.float64)
        bound = len(bag) * 2**-24 * weight[bag].abs().sum(0) if bag else torch.zeros(3, dtype=torch.float64)
        assert bool(((row - exact).abs() <= bound).all())
    assert any(len(b) == 0 for b in bags) and any(len(b) > 2 for b in bags)


def test_a_bag_chosen_for_the_new_id_row_becomes_that_one_id():
    frame = tagged_log(seed=4, n=3000)
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    encoded = encoder.transform(frame)
    new_ids = {f: n - 1 for f, n in encoder.cardinalities.items()}
    index = torch.arange(len(frame))
    plain = ClickBatches(encoded).batch(index).args[1]["tags"]
    dropped = ClickBatches(encoded, new_id_share=0.3, new_ids=new_ids, seed=2)
    after = dropped.batch(index).args[1]["tags"]
    assert torch.equal(after.values(), dropped.batch(index).args[1]["tags"].values())  # the same every time
    before = [b.tolist() for b in torch.split(plain.values(), plain.lengths().tolist())]
    now = [b.tolist() for b in torch.split(after.values(), after.lengths().tolist())]
    replaced = [b == [new_ids["tags"]] for b in now]
    assert all(new == old for new, old, r in zip(now, before, replaced) if not r)
    # Binomial(rows, 0.3): 5 standard deviations either side
    rows = len(frame)
    assert abs(sum(replaced) - 0.3 * rows) <= 5 * (rows * 0.3 * 0.7) ** 0.5
    # the hash picks pairs by (row, key position): a batch of some rows picks the same bags
    part = torch.tensor([7, 2, 2999, 40])
    some = dropped.batch(part).args[1]["tags"]
    assert [b.tolist() for b in torch.split(some.values(), some.lengths().tolist())] == [now[k] for k in part.tolist()]
