"""NewIds and NewIdEncoder: a segment's values the base's encoder never saw get ids V + j (int and
string vocabularies, bag features), and the merged encoder appends them with the unseen id last;
checked against ids worked out by hand from the fitted vocabularies."""

import json

import pandas as pd
import pytest
import torch

from recpeft.datasets import FeatureEncoder, Schema
from recpeft.datasets.encoding import PAD
from recpeft.datasets.new_ids import NewIdEncoder, NewIds, oov_last_order

SCHEMA = Schema(user="user_id", item="item_id", segment=None, timestamp=None, categorical=("tags",), bags=("tags",))
BASE = pd.DataFrame({"user_id": [5, 7, 9], "item_id": ["b", "a", "c"], "tags": ["x|y", "y", "x"], "clicked": [0, 1, 0]})
NEW = pd.DataFrame(
    {"user_id": [11, 7, 3, 11], "item_id": ["a", "zz", "c", "d"], "tags": ["w|x", "v", "y", "w"], "clicked": [1] * 4}
)


@pytest.fixture
def encoder():
    return FeatureEncoder().fit(BASE, SCHEMA)


def test_unseen_values_of_a_segment_get_ids_past_the_base_table(encoder):
    new = NewIds.unseen_in(encoder, NEW, ["user_id", "item_id", "tags"])
    assert new.values == {"user_id": [3, 11], "item_id": ["d", "zz"], "tags": ["v", "w"]}
    adapted = NewIdEncoder(encoder, new)
    adapted.transform(NEW)  # the new values are known to it ...
    with pytest.raises(ValueError, match="value 42 was not seen"):  # ... others are not
        adapted.transform(NEW.assign(user_id=[11, 7, 3, 42]))
    encoded = adapted.transform(NEW.assign(user_id=[11, 7, 3, 42]), unseen="oov")
    rows = encoder.cardinalities  # V: the fitted values and the unseen id
    assert rows == {"user_id": 4, "item_id": 4, "tags": 3}
    # by hand: fitted value k → k, new value u_j → V + j, anything else → the unseen id V − 1
    assert encoded.sparse["user_id"].tolist() == [4 + 1, 1, 4 + 0, 3]
    assert encoded.sparse["item_id"].tolist() == [0, 4 + 1, 2, 4 + 0]
    assert encoded.sparse["tags"].tolist() == [[3 + 1, 0], [3 + 0, PAD], [1, PAD], [3 + 1, PAD]]
    assert torch.equal(encoded.dense, encoder.transform(NEW, unseen="oov").dense)


def test_a_value_that_cannot_be_of_the_fitted_kind_stays_unseen(encoder):
    frame = NEW.assign(user_id=["0126", "12", "12", "x"])
    new = NewIds.unseen_in(encoder, frame, ["user_id"])
    assert new.values == {"user_id": [12]}  # "0126" and "x" are not ints of the vocabulary
    assert NewIdEncoder(encoder, new).transform(frame, unseen="oov").sparse["user_id"].tolist() == [3, 4, 4, 3]


def test_the_merged_encoder_appends_the_new_values_and_keeps_the_unseen_id_last(encoder, tmp_path):
    new = NewIds.unseen_in(encoder, NEW, ["user_id"])
    merged = NewIdEncoder(encoder, new).merged()
    merged.save(tmp_path / "encoder.json")
    loaded = FeatureEncoder.load(tmp_path / "encoder.json")
    assert loaded.vocabulary("user_id") == [5, 7, 9, 3, 11]
    assert loaded.cardinalities == {**encoder.cardinalities, "user_id": 6}
    ids = loaded.transform(NEW.assign(user_id=[11, 7, 3, 42]), unseen="oov").sparse["user_id"]
    assert ids.tolist() == [4, 1, 3, 5]  # u_j → n + j, the unseen id n + m
    assert encoder.vocabulary("user_id") == [5, 7, 9]  # the base's encoder is unchanged
    with pytest.raises(TypeError, match="merged"):
        NewIdEncoder(encoder, new).save(tmp_path / "not_a_base.json")


def test_oov_last_order_moves_the_new_id_row_behind_the_new_rows():
    table = torch.arange(3 + 1 + 2)  # fitted rows 0..2, the new-id row 3, new ids' rows 4, 5
    assert table[oov_last_order(3, 2)].tolist() == [0, 1, 2, 4, 5, 3]
    assert oov_last_order(3, 0).tolist() == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"user_id": [7]}, "value 7 is already in the base's vocabulary"),
        ({"user_id": [3, 3]}, "repeats new values"),
        ({"user_id": ["3"]}, "needs int values"),
        ({"nope": [1]}, "'nope' is not a sparse feature"),
    ],
)
def test_new_ids_that_do_not_fit_the_encoder_are_refused_naming_the_file(encoder, values, message):
    with pytest.raises(ValueError, match=f"^ad/new_ids.json: .*{message}"):
        NewIdEncoder(encoder, NewIds(values), name="ad/new_ids.json")


def test_new_ids_json_round_trips_and_refuses_other_files():
    new = NewIds({"user_id": [3, 11], "item_id": ["d"]})
    assert NewIds.from_json(new.to_json()) == new
    assert new.counts == {"user_id": 2, "item_id": 1}
    with pytest.raises(ValueError, match="f.json: not a recpeft.NewIds version 1 file"):
        NewIds.from_json(json.dumps({"format": "other"}), name="f.json")
    with pytest.raises(ValueError, match="f.json: field 'values'"):
        NewIds.from_json(json.dumps({"format": "recpeft.NewIds", "version": 1, "values": [1]}), name="f.json")
