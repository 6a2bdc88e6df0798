"""Ids and segment names read the same from CSV, Parquet and DataFrames: no silent merging of
"0126" and "126", no shift when a base fitted on Parquet meets the same rows as CSV."""

import json
import warnings

import numpy as np
import pandas as pd
import pytest

from recpeft.datasets import FeatureEncoder, Schema, load_interactions, split_by_time
from recpeft.datasets.sources import Roles, load_source

SCHEMA = Schema(user="user", item="item", label="label", segment="market", timestamp="day", categorical=("shelf",))


def _log(items, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = len(items)
    return pd.DataFrame(
        {
            "user": rng.integers(1, 30, size=n),
            "item": items,
            "shelf": rng.choice(["01", "1", "A1"], size=n),
            "label": rng.integers(0, 2, size=n),
            "market": rng.choice(["DE", "FR"], size=n),
            "day": (pd.Timestamp("2026-01-01") + pd.to_timedelta(rng.integers(0, 20, size=n), unit="D")).strftime(
                "%Y-%m-%d"
            ),
        }
    )


def _write(frame: pd.DataFrame, path):
    if path.suffix == ".parquet":
        frame.to_parquet(path)
    else:
        frame.to_csv(path, index=False)
    return path


def _expected_codes(fit_texts, texts) -> list[int]:
    """Independent encoding: sorted distinct texts of the fitting rows (numerically when every one
    is a decimal integer without leading zeros), unseen → len(vocabulary)."""
    distinct = sorted(set(fit_texts))
    if all(t.lstrip("-").isdigit() and (t.lstrip("-") == "0" or not t.lstrip("-").startswith("0")) for t in distinct):
        distinct = [str(v) for v in sorted(int(t) for t in distinct)]
    position = {t: k for k, t in enumerate(distinct)}
    return [position.get(t, len(distinct)) for t in texts]


STRING_IDS = ["0126", "126", "00126", "7", "007", "126", "0126", "10"] * 5  # digits only: pandas read ints
MIXED_IDS = ["0126", "126", "sku-3", "7", "10"] * 6
DECIMAL_IDS = ["126", "7", "30", "4", "126", "1000"] * 6


@pytest.mark.parametrize("ids", [STRING_IDS, MIXED_IDS, DECIMAL_IDS], ids=["leading zeros", "mixed", "decimal"])
@pytest.mark.parametrize("fit_on", [".parquet", ".csv"])
def test_same_rows_map_to_the_same_ids_from_every_format(tmp_path, ids, fit_on):
    raw = _log(ids)
    loaded = {
        suffix: load_interactions(_write(raw, tmp_path / f"log{suffix}"), SCHEMA) for suffix in (".csv", ".parquet")
    }
    loaded["frame"] = load_interactions(raw, SCHEMA)
    encoder = FeatureEncoder().fit(loaded[fit_on], SCHEMA)
    for source, frame in loaded.items():
        encoded = encoder.transform(frame, unseen="error", name=source)  # zero unseen rows
        for feature in ("item", "shelf"):
            expected = _expected_codes(raw[feature].astype(str), raw[feature].astype(str))
            assert encoded.sparse[feature].tolist() == expected, (source, feature)


def test_leading_zeros_stay_distinct_ids(tmp_path):
    raw = _log(STRING_IDS)
    frame = load_interactions(_write(raw, tmp_path / "log.csv"), SCHEMA)
    assert frame["item"].tolist() == STRING_IDS
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    assert len(encoder.vocabulary("item")) == len(set(STRING_IDS))
    assert sorted(encoder.vocabulary("shelf")) == ["01", "1", "A1"]


def test_integer_vocabulary_refuses_zero_padded_text():
    """An int vocabulary (fitted on 126, 7) sees "0126" as unseen, not as 126."""
    fitted = load_interactions(_log(["126", "7"] * 4), SCHEMA)
    encoder = FeatureEncoder().fit(fitted, SCHEMA)
    assert encoder.vocabulary("item") == [7, 126]
    later = _log(["126", "7"] * 4)
    later["item"] = ["0126", "126", "7.0", "7", "126", "0126", "7", "7"]
    with pytest.raises(ValueError, match=r"column 'item', index 0: value '0126' was not seen .*\(3 such rows\)"):
        encoder.transform(later)
    codes = encoder.transform(later, unseen="oov").sparse["item"].tolist()
    assert codes == [2, 1, 2, 0, 1, 2, 0, 0]  # "7.0" is text, not the integer 7


def test_encoder_files_of_the_old_format_map_as_before():
    """A saved encoder's kind and order are kept: int vocabularies match decimal text, string
    vocabularies (sorted as strings when fitted) match ints by their decimal text."""
    encoder = FeatureEncoder().fit(load_interactions(_log(["126", "7", "30"] * 3), SCHEMA), SCHEMA)
    data = json.loads(encoder.to_json())
    data["sparse"]["item"] = {"kind": "str", "values": ["10", "126", "7"]}  # string order, as saved
    old = FeatureEncoder.from_json(json.dumps(data))
    frame = _log([7, 126, 10, 8])
    assert old.transform(frame, unseen="oov").sparse["item"].tolist() == [2, 1, 0, 3]


def test_spaces_in_segment_values_are_stripped_with_a_warning(tmp_path):
    raw = _log(DECIMAL_IDS)
    raw["market"] = [" DE", "DE", "DE ", "FR"] * 9
    spaced = sum(m != m.strip() for m in raw["market"])
    path = _write(raw, tmp_path / "log.csv")
    with pytest.warns(UserWarning, match=rf"log\.csv: column 'market', row 1: stripped .* from {spaced} segment value"):
        frame = load_interactions(path, SCHEMA)
    assert sorted(frame["market"].unique()) == ["DE", "FR"]
    assert FeatureEncoder().fit(frame, SCHEMA).segments == ["DE", "FR"]
    assert sorted(split_by_time(frame, SCHEMA, test_fraction=0.3).cuts) == ["DE", "FR"]


def test_spaces_in_ids_are_kept_with_a_warning(tmp_path):
    raw = _log(["126", " 126", "7"] * 4)
    with pytest.warns(UserWarning, match=r"column 'item', row 2: 4 value\(s\) have leading or trailing spaces"):
        frame = load_interactions(_write(raw, tmp_path / "log.csv"), SCHEMA)
    assert sorted(set(frame["item"])) == [" 126", "126", "7"]


def test_only_an_empty_csv_field_is_missing(tmp_path):
    """'NA' is Namibia and 'null' an id: pandas' default NA words are not missing values."""
    raw = _log(["NA", "null", "None", "7"] * 3)
    raw["market"] = ["NA", "DE", "NA", "FR"] * 3
    frame = load_interactions(_write(raw, tmp_path / "log.csv"), SCHEMA)
    assert frame["item"].tolist() == raw["item"].tolist() and frame["market"].tolist() == raw["market"].tolist()
    raw2 = raw.copy()
    raw2.loc[0, "user"] = None
    with pytest.raises(ValueError, match=r"gap\.csv: column 'user', row 1: missing id"):
        load_interactions(_write(raw2, tmp_path / "gap.csv"), SCHEMA)


def test_load_source_passes_the_roles(tmp_path):
    raw = _log(STRING_IDS)
    path = _write(raw, tmp_path / "log.csv")
    roles = Roles(segment="market", timestamp="day", categorical=("shelf",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        frame, schema = load_source(path, "interactions", roles)
    assert frame["item"].tolist() == STRING_IDS and schema == SCHEMA


def test_the_shop_as_csv_maps_to_the_rows_of_its_parquet(tmp_path):
    from recpeft.datasets.synthetic import SHOP_SCHEMA, load_shop

    shop = load_shop().head(20_000)
    shop.to_parquet(tmp_path / "shop.parquet")
    shop.to_csv(tmp_path / "shop.csv", index=False)
    encoder = FeatureEncoder().fit(shop, SHOP_SCHEMA)  # as the demo fits it: the raw frame
    expected = encoder.transform(shop)
    for name in ("shop.parquet", "shop.csv"):
        encoded = encoder.transform(load_interactions(tmp_path / name, SHOP_SCHEMA), name=name)
        for feature in SHOP_SCHEMA.sparse_features:
            assert encoded.sparse[feature].equal(expected.sparse[feature]), (name, feature)
        assert encoded.timestamps.equal(expected.timestamps) and encoded.segments.equal(expected.segments)
