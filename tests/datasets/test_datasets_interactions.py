"""Schema, load_interactions, FeatureEncoder and the time splits, on fresh random logs."""

import gzip
import json

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft.datasets import FeatureEncoder, Schema, check_segments, leave_last_out, load_interactions, split_by_time

SCHEMA = Schema(
    user="user",
    item="item",
    label="label",
    segment="market",
    timestamp="time",
    categorical=("brand",),
    dense=("price", "score"),
)


def random_log(seed: int, n: int = 400) -> pd.DataFrame:
    """A log with int users, string items, three markets of unequal size, tied timestamps (whole
    days), a heavy-tailed nonnegative price, a signed score and an unused extra column."""
    rng = np.random.default_rng(seed)
    days = rng.integers(0, 30, size=n)
    return pd.DataFrame(
        {
            "user": rng.integers(100, 160, size=n),
            "item": [f"sku{k}" for k in rng.integers(0, 40, size=n)],
            "brand": rng.choice(["acme", "zeta", "nova"], size=n),
            "price": rng.lognormal(2.0, 1.5, size=n),
            "score": rng.normal(size=n),
            "label": rng.integers(0, 2, size=n),
            "market": rng.choice(["UK", "DE", "FR"], size=n, p=[0.6, 0.25, 0.15]),
            "time": (pd.Timestamp("2024-01-01") + pd.to_timedelta(days, unit="D")).strftime("%Y-%m-%d"),
            "extra": rng.normal(size=n),
        }
    )


# -- Schema ---------------------------------------------------------------------------------------
def test_schema_roles_round_trip_and_duplicates():
    assert SCHEMA.sparse_features == ("user", "item", "brand")
    assert Schema.from_dict(json.loads(json.dumps(SCHEMA.to_dict()))) == SCHEMA
    click = Schema(user=None, item=None, segment=None, timestamp=None, categorical=["C1", "C2"])
    assert click.sparse_features == ("C1", "C2") and click.categorical == ("C1", "C2")
    with pytest.raises(ValueError, match="'item' has two roles, item and categorical"):
        Schema(categorical=("item",))
    with pytest.raises(ValueError, match="no sparse feature"):
        Schema(user=None, item=None)
    with pytest.raises(ValueError, match="unknown keys \\['colour'\\]"):
        Schema.from_dict({"colour": "red"})
    with pytest.raises(ValueError, match="write \\('price',\\)"):
        Schema(dense="price")


# -- load_interactions ----------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz", ".parquet"])
def test_files_and_frames_load_the_same(tmp_path, suffix):
    raw = random_log(1)
    path = tmp_path / f"log{suffix}"
    if suffix == ".parquet":
        raw.to_parquet(path)
    elif suffix == ".csv.gz":
        with gzip.open(path, "wt") as handle:
            raw.to_csv(handle, index=False)
    else:
        raw.to_csv(path, index=False)
    loaded = load_interactions(path, SCHEMA)
    assert list(loaded.columns) == list(SCHEMA.columns)  # extra column dropped
    assert loaded["time"].dtype == "datetime64[ns]" and loaded["label"].dtype == np.float32
    np.testing.assert_array_equal(loaded["time"].to_numpy(), pd.to_datetime(raw["time"]).to_numpy())
    np.testing.assert_allclose(loaded["price"].to_numpy(), raw["price"].to_numpy(), rtol=1e-15)
    np.testing.assert_array_equal(loaded["label"].to_numpy(), raw["label"].to_numpy().astype(np.float32))
    assert loaded["market"].tolist() == raw["market"].tolist()
    assert loaded["item"].tolist() == raw["item"].tolist()
    from_frame = load_interactions(raw, SCHEMA)
    pd.testing.assert_frame_equal(
        from_frame.astype({"item": object, "brand": object, "market": object}),
        loaded.astype({"item": object, "brand": object, "market": object}),
    )


def test_epoch_seconds_and_bool_labels():
    rng = np.random.default_rng(2)
    seconds = rng.integers(1_600_000_000, 1_700_000_000, size=20)
    frame = pd.DataFrame(
        {
            "user": rng.integers(0, 5, 20),
            "item": rng.integers(0, 5, 20),
            "label": rng.random(20) < 0.5,
            "timestamp": seconds,
        }
    )
    loaded = load_interactions(frame, Schema(segment=None))
    assert (loaded["timestamp"].to_numpy().astype("int64") == seconds * 10**9).all()
    np.testing.assert_array_equal(loaded["label"].to_numpy(), frame["label"].to_numpy().astype(np.float32))


def _csv(tmp_path, frame, name="bad.csv"):
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.mark.parametrize(
    "column, value, message",
    [
        ("label", 2, "column 'label', row 6: the label must be 0 or 1 (or a boolean), got 2"),
        ("price", "cheap", "column 'price', row 6: the dense value must be a finite number, got 'cheap'"),
        ("price", np.inf, "column 'price', row 6: the dense value must be a finite number"),
        ("price", None, "column 'price', row 6: the dense value is missing"),
        ("time", "not a date", "column 'time', row 6: cannot read the timestamp 'not a date'"),
        ("user", None, "column 'user', row 6: missing id"),
        ("market", None, "column 'market', row 6: missing id"),
    ],
)
def test_bad_values_name_file_column_and_row(tmp_path, column, value, message):
    frame = random_log(3, n=12)
    frame[column] = frame[column].astype(object)
    frame.loc[5, column] = value
    path = _csv(tmp_path, frame)
    with pytest.raises(ValueError, match=f"{path}: {message}".replace("(", "\\(").replace(")", "\\)")):
        load_interactions(path, SCHEMA)
    frame.index = frame.index + 100  # a DataFrame is named by its index label
    with pytest.raises(ValueError, match=f"shop log: column '{column}', index 105"):
        load_interactions(frame, SCHEMA, name="shop log")


def test_missing_columns_and_empty_files(tmp_path):
    frame = random_log(4, n=5).drop(columns=["brand", "price"])
    path = _csv(tmp_path, frame)
    with pytest.raises(
        ValueError,
        match=r"bad.csv: missing column\(s\) \['brand', 'price'\]; the available "
        r"columns are \['user', 'item', 'score'",
    ):
        load_interactions(path, SCHEMA)
    frame.to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match=r"bad.parquet: missing column\(s\) \['brand', 'price'\]"):
        load_interactions(tmp_path / "bad.parquet", SCHEMA)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty.csv: the file is empty"):
        load_interactions(tmp_path / "empty.csv", SCHEMA)
    (tmp_path / "header.csv").write_text(",".join(SCHEMA.columns) + "\n")
    with pytest.raises(ValueError, match="header.csv: no data rows"):
        load_interactions(tmp_path / "header.csv", SCHEMA)
    (tmp_path / "log.xlsx").touch()
    with pytest.raises(ValueError, match="log.xlsx: unknown file type"):
        load_interactions(tmp_path / "log.xlsx", SCHEMA)


def test_check_segments_counts_and_names_the_empty_one():
    frame = load_interactions(random_log(5), SCHEMA)
    counts = check_segments(frame, SCHEMA, ["DE", "UK"])
    assert counts == {"DE": int((frame["market"] == "DE").sum()), "UK": int((frame["market"] == "UK").sum())}
    with pytest.raises(ValueError, match=r"column 'market' has no rows for segment\(s\) \['ES'\]"):
        check_segments(frame, SCHEMA, ["DE", "ES"], name="log.csv")


# -- FeatureEncoder -------------------------------------------------------------------------------
def test_encoder_matches_hand_computation_and_round_trips(tmp_path):
    frame = load_interactions(random_log(6), SCHEMA)
    encoder = FeatureEncoder().fit(frame, SCHEMA)
    encoded = encoder.transform(frame)
    for feature in SCHEMA.sparse_features:
        values = sorted(set(frame[feature].tolist()))
        assert encoder.cardinalities[feature] == len(values) + 1
        expected = [values.index(v) for v in frame[feature]]
        assert encoded.sparse[feature].dtype == torch.int64
        assert encoded.sparse[feature].tolist() == expected
    # price is nonnegative and heavy-tailed → log1p; score is signed → identity
    assert encoder.dense_stats["price"]["log1p"] and not encoder.dense_stats["score"]["log1p"]
    price = np.log1p(frame["price"].to_numpy(np.float64))
    score = frame["score"].to_numpy(np.float64)
    expected = np.stack([(price - price.mean()) / price.std(), (score - score.mean()) / score.std()], axis=1)
    torch.testing.assert_close(encoded.dense, torch.from_numpy(expected).float(), rtol=1e-6, atol=1e-6)
    assert encoded.segment_names == ["DE", "FR", "UK"]
    assert encoded.segments.tolist() == [["DE", "FR", "UK"].index(m) for m in frame["market"]]
    assert encoded.labels.tolist() == frame["label"].tolist()
    assert encoded.timestamps.tolist() == frame["time"].to_numpy().astype("int64").tolist()
    assert encoded.rows.tolist() == list(range(len(frame)))

    encoder.save(tmp_path / "enc" / "encoder.json")
    again = FeatureEncoder.load(tmp_path / "enc" / "encoder.json")
    assert again.cardinalities == encoder.cardinalities and again.segments == encoder.segments
    other = load_interactions(random_log(7), SCHEMA)  # a later table: its own rows, same ids
    first, second = encoder.transform(other, unseen="oov"), again.transform(other, unseen="oov")
    for feature in SCHEMA.sparse_features:
        assert torch.equal(first.sparse[feature], second.sparse[feature])
    assert torch.equal(first.dense, second.dense)


def test_unseen_values_error_or_oov():
    frame = load_interactions(random_log(8), SCHEMA)
    encoder = FeatureEncoder().fit(frame.iloc[:200], SCHEMA)
    later = frame.iloc[200:].copy()
    later.loc[later.index[3], "item"] = "brand-new"
    with pytest.raises(
        ValueError, match=f"later rows: column 'item', index {later.index[3]}: value 'brand-new' was not seen"
    ):
        encoder.transform(later, name="later rows")
    encoded = encoder.transform(later, unseen="oov")
    vocab = encoder.vocabulary("item")
    oov = encoder.cardinalities["item"] - 1
    expected = [vocab.index(v) if v in vocab else oov for v in later["item"]]
    assert encoded.sparse["item"].tolist() == expected and expected[3] == oov
    assert encoded.rows.tolist() == later.index.tolist()
    # an int vocabulary given strings: numeric strings match, others are unseen
    later["user"] = later["user"].astype(str)
    later.loc[later.index[0], "user"] = "guest"
    users = encoder.transform(later, unseen="oov").sparse["user"]
    user_vocab = encoder.vocabulary("user")
    assert users[0] == encoder.cardinalities["user"] - 1
    assert users[1:].tolist() == [
        user_vocab.index(int(u)) if int(u) in user_vocab else len(user_vocab) for u in later["user"].iloc[1:]
    ]
    fresh = frame.iloc[200:].copy()
    fresh.loc[fresh.index[2], "market"] = "ES"
    full = FeatureEncoder().fit(frame, SCHEMA)
    with pytest.raises(ValueError, match=f"column 'market', index {fresh.index[2]}: segment 'ES' was not seen"):
        full.transform(fresh)
    codes = full.transform(fresh, unseen="oov").segments
    assert codes[2] == -1 and codes[3] == full.segments.index(fresh["market"].iloc[3])


def test_encoder_rejects_bad_dense_and_files(tmp_path):
    frame = load_interactions(random_log(9), SCHEMA)
    encoder = FeatureEncoder().fit(frame, SCHEMA, log1p=["price"])
    bad = frame.copy()
    bad.loc[7, "price"] = -1.0
    with pytest.raises(ValueError, match="column 'price', index 7: dense value must be a finite number ≥ 0"):
        encoder.transform(bad)
    with pytest.raises(ValueError, match=r"column\(s\) \['score'\] hold negatives"):
        FeatureEncoder().fit(frame, SCHEMA, log1p="all")
    (tmp_path / "enc.json").write_text("{not json")
    with pytest.raises(ValueError, match="enc.json is not valid JSON"):
        FeatureEncoder.load(tmp_path / "enc.json")


# -- splits ---------------------------------------------------------------------------------------
def test_split_by_time_per_segment_quantiles():
    frame = load_interactions(random_log(10, n=600), SCHEMA)
    parts = split_by_time(frame, SCHEMA, test_fraction=0.2, valid_fraction=0.1)
    assert sorted(parts.train.index.tolist() + parts.valid.index.tolist() + parts.test.index.tolist()) == list(
        range(len(frame))
    )
    for market, rows in frame.groupby("market"):
        times = rows["time"]
        train, valid, test = (p[p["market"] == market]["time"] for p in (parts.train, parts.valid, parts.test))
        assert len(train) and len(test)
        # every part is a time interval, earlier parts strictly before later ones: no shared timestamp
        assert train.max() < valid.min() <= valid.max() < test.min()
        # brute force: the test cut is the (n - n_test)-th smallest time; everything at or after it is test
        n = len(times)
        cut = np.sort(times.to_numpy())[n - max(1, round(0.2 * n))]
        assert set(test.index) == set(times.index[times >= cut])
        assert parts.cuts[market][1] == pd.Timestamp(cut)
        assert len(test) >= round(0.2 * n)


def test_split_by_time_fixed_cuts_and_errors():
    frame = load_interactions(random_log(11), SCHEMA)
    parts = split_by_time(frame, SCHEMA, test_start="2024-01-21", valid_start="2024-01-15")
    t = frame["time"]
    assert set(parts.test.index) == set(frame.index[t >= "2024-01-21"])
    assert set(parts.valid.index) == set(frame.index[(t >= "2024-01-15") & (t < "2024-01-21")])
    assert set(parts.train.index) == set(frame.index[t < "2024-01-15"])
    late = frame.copy()
    late.loc[late["market"] == "FR", "time"] = pd.Timestamp("2024-02-01")
    with pytest.raises(ValueError, match="segment 'FR' has an empty train part"):
        split_by_time(late, SCHEMA, test_start="2024-01-21")
    with pytest.raises(ValueError, match="segment 'FR' has an empty train part"):
        split_by_time(late, SCHEMA)  # all FR rows share one time: the tie goes to test
    with pytest.raises(ValueError, match="valid_start '2024-01-25' is after test_start"):
        split_by_time(frame, SCHEMA, test_start="2024-01-21", valid_start="2024-01-25")


def test_split_without_segments_cuts_globally():
    frame = load_interactions(random_log(13), SCHEMA)
    schema = Schema(user="user", item="item", segment=None, timestamp="time")
    parts = split_by_time(frame, schema, test_fraction=0.3, valid_fraction=0.0)
    times = np.sort(frame["time"].to_numpy())
    cut = times[len(times) - round(0.3 * len(times))]
    assert list(parts.cuts) == ["(all rows)"] and len(parts.valid) == 0
    assert set(parts.test.index) == set(frame.index[frame["time"] >= cut])
    assert parts.train["time"].max() < parts.test["time"].min()


def test_int_ids_beyond_float_precision_stay_exact():
    big = 2**60 + np.random.default_rng(14).permutation(50)
    frame = pd.DataFrame({"user": big[:40], "item": big[10:], "label": np.arange(40) % 2})
    schema = Schema(segment=None, timestamp=None)
    encoder = FeatureEncoder().fit(frame, schema)
    assert encoder.vocabulary("user") == sorted(int(u) for u in big[:40])
    swapped = frame.assign(user=big[10:])  # ids 2**60 + k differ in the last bits only
    users = encoder.transform(swapped, unseen="oov").sparse["user"].tolist()
    known = sorted(int(u) for u in big[:40])
    assert users == [known.index(int(u)) if int(u) in known else 40 for u in big[10:]]


def test_leave_last_out_matches_brute_force():
    rng = np.random.default_rng(12)
    n = 200
    frame = pd.DataFrame(
        {"user": rng.integers(0, 30, n), "item": rng.integers(0, 50, n), "t": rng.integers(0, 20, n)},
        index=rng.permutation(n) + 1000,
    )
    parts = leave_last_out(frame, "user", "t")
    for user, rows in frame.groupby("user"):
        ordered = sorted(rows.index, key=lambda i: (rows.loc[i, "t"], frame.index.get_loc(i)))
        if len(ordered) < 3:
            assert set(ordered) <= set(parts.train.index)
            continue
        assert parts.test.index[parts.test["user"] == user].tolist() == [ordered[-1]]
        assert parts.valid.index[parts.valid["user"] == user].tolist() == [ordered[-2]]
        assert set(parts.train.index[parts.train["user"] == user]) == set(ordered[:-2])
    with pytest.raises(ValueError, match="no column 'when'"):
        leave_last_out(frame, "user", "when")


def test_validation_share_is_of_the_rows_before_the_test_cut():
    times = pd.date_range("2025-01-01", periods=100, freq="h")
    frame = pd.DataFrame(
        {
            "user": np.arange(100),
            "item": np.arange(100),
            "label": np.arange(100) % 2,
            "segment": "a",
            "timestamp": times,
        }
    )
    schema = Schema()
    parts = split_by_time(frame, schema, test_start=times[60], valid_fraction=0.25)
    assert (len(parts.train), len(parts.valid), len(parts.test)) == (45, 15, 40)
    assert parts.valid["timestamp"].min() > parts.train["timestamp"].max()
    with pytest.raises(ValueError, match="test_start 'soon' is not a time"):
        split_by_time(frame, schema, test_start="soon")
