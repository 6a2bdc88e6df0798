"""MovieLens (ML-100K, ML-1M: user attributes, genre bags) and Criteo TSV readers, on small random
files written here, and the --categorical / --dense rule of every format (``load_source``)."""

import gzip

import numpy as np
import pandas as pd
import pytest
import torch

from recpeft.datasets import ClickBatches, FeatureEncoder, load_criteo, load_movielens
from recpeft.datasets.sources import Roles, load_source
from recpeft.datasets.synthetic import SHOP_SCHEMA
from recpeft.models.dlrm import build_click_model

GENRES_100K = [
    "unknown",
    "Action",
    "Adventure",
    "Animation",
    "Children's",
    "Comedy",
    "Crime",
    "Documentary",
    "Drama",
    "Fantasy",
    "Film-Noir",
    "Horror",
    "Musical",
    "Mystery",
    "Romance",
    "Sci-Fi",
    "Thriller",
    "War",
    "Western",
]
OCCUPATIONS_1M = [
    "other",
    "academic/educator",
    "artist",
    "clerical/admin",
    "college/grad student",
    "customer service",
    "doctor/health care",
    "executive/managerial",
    "farmer",
    "homemaker",
    "K-12 student",
    "lawyer",
    "programmer",
    "retired",
    "sales/marketing",
    "scientist",
    "self-employed",
    "technician/engineer",
    "tradesman/craftsman",
    "unemployed",
    "writer",
]
AGE_NAMES_1M = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}


def bucket(age: int) -> str:
    """ML-1M's age bucket of an age in years, written out as the ML-1M README lists them."""
    for upper, name in ((18, "Under 18"), (25, "18-24"), (35, "25-34"), (45, "35-44"), (50, "45-49"), (56, "50-55")):
        if age < upper:
            return name
    return "56+"


def ratings(rng, n_users, n_items, n=120):
    return [
        (int(u), int(i), int(r), int(t))
        for u, i, r, t in zip(
            rng.integers(1, n_users + 1, n),
            rng.integers(1, n_items + 1, n),
            rng.integers(1, 6, n),
            rng.integers(874_724_710, 893_286_638, n),
        )
    ]


def zip_code(rng) -> str:
    """A US ZIP (5 digits, sometimes ZIP+4), a Canadian postal code (upper or lower case) or none."""
    kind = rng.integers(0, 5)
    digits = f"{int(rng.integers(0, 100_000)):05d}"
    if kind == 0:
        return f"{digits}-{int(rng.integers(0, 10_000)):04d}"
    if kind == 1:
        code = "".join(str(rng.choice(list("ABCEGHJKLMNPRSTVXY"))) + str(int(rng.integers(0, 10))) for _ in range(3))
        return code if rng.random() < 0.5 else code.lower()
    return digits


def zip_prefix(code: str) -> str:
    """The first character, as the loader documents it: upper case, "unknown" for no code."""
    return code[0].upper() if code else "unknown"


def write_100k(folder, seed):
    """Returns (ratings, users {id: (age, gender, occupation, zip)}, genres {item: [names]})."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = ratings(rng, 12, 15)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    users = {
        u: (
            int(rng.integers(7, 74)),
            str(rng.choice(["M", "F"])),
            str(rng.choice(["writer", "technician", "student"])),
            zip_code(rng) if u != 5 else "",
        )
        for u in range(1, 13)
    }
    (folder / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{z}\n" for u, (a, g, o, z) in users.items()))
    genres, lines = {}, []
    for item in range(1, 16):
        flags = (rng.random(19) < 0.2).astype(int)
        genres[item] = [GENRES_100K[k] for k in np.flatnonzero(flags)] or ["unknown"]
        lines.append(
            f"{item}|Film {item} ({1990 + item})|01-Jan-{1990 + item}||http://x/{item}|"
            + "|".join(map(str, flags))
            + "\n"
        )
    (folder / "u.item").write_bytes("".join(lines).replace("Film 3", "Café 3").encode("latin-1"))
    return rows, users, genres


def write_1m(folder, seed):
    """Returns (ratings, users {id: (age code, gender, occupation code, zip)}, genres {item: [names]})."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = ratings(rng, 10, 14)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    users = {
        u: (int(rng.choice(list(AGE_NAMES_1M))), str(rng.choice(["M", "F"])), int(rng.integers(0, 21)), zip_code(rng))
        for u in range(1, 11)
    }
    (folder / "users.dat").write_text("".join(f"{u}::{g}::{a}::{o}::{z}\n" for u, (a, g, o, z) in users.items()))
    genres, lines = {}, []
    for item in range(1, 15):
        genres[item] = [str(g) for g in rng.choice(GENRES_100K[1:], size=int(rng.integers(1, 4)), replace=False)]
        lines.append(f"{item}::Película {item} ({1990 + item})::{'|'.join(genres[item])}\n")
    (folder / "movies.dat").write_bytes("".join(lines).encode("latin-1"))
    return rows, users, genres


ML_FEATURES = ("age", "gender", "occupation", "zip_prefix", "genres")


def expected_features(rows, user_attributes, genres) -> dict[str, list]:
    """Every default feature column, written out from what the writer chose: user → (age
    bucket, gender, occupation name, zip code)."""
    users, items = [u for u, *_ in rows], [i for _, i, *_ in rows]
    columns = {name: [user_attributes[u][k] for u in users] for k, name in enumerate(("age", "gender", "occupation"))}
    columns["zip_prefix"] = [zip_prefix(user_attributes[u][3]) for u in users]
    columns["genres"] = ["|".join(genres[i]) for i in items]
    return columns


@pytest.mark.parametrize("segment_by", ["gender", "age", "occupation"])
def test_ml100k(tmp_path, segment_by):
    rows, users, genres = write_100k(tmp_path / "ml-100k", seed=1)
    frame, schema = load_movielens(tmp_path / "ml-100k", segment_by=segment_by)
    assert schema.sparse_features == ("user", "item", *ML_FEATURES) and schema.bags == ("genres",)
    assert schema.segment == "segment" and schema.dense == ()
    named = {u: (bucket(a), g, o, z) for u, (a, g, o, z) in users.items()}
    attribute = {"age": 0, "gender": 1, "occupation": 2}[segment_by]
    assert frame["user"].tolist() == [u for u, _, _, _ in rows]
    assert frame["item"].tolist() == [i for _, i, _, _ in rows]
    assert frame["label"].tolist() == [float(r >= 4) for _, _, r, _ in rows]
    assert frame["segment"].tolist() == [named[u][attribute] for u, _, _, _ in rows]
    assert frame["timestamp"].tolist() == [pd.Timestamp(t, unit="s") for _, _, _, t in rows]
    for column, values in expected_features(rows, named, genres).items():
        assert frame[column].tolist() == values, column
    assert "unknown" in frame["zip_prefix"].tolist() or 5 not in frame["user"].tolist()
    encoder = FeatureEncoder().fit(frame, schema)
    assert encoder.cardinalities["user"] == len({u for u, _, _, _ in rows}) + 1
    seen_genres = {g for _, i, _, _ in rows for g in genres[i]}
    assert encoder.vocabulary("genres") == sorted(seen_genres)


@pytest.mark.parametrize("segment_by", ["age", "occupation"])
def test_ml1m(tmp_path, segment_by):
    rows, users, genres = write_1m(tmp_path / "ml-1m", seed=2)
    frame, schema = load_movielens(tmp_path / "ml-1m", segment_by=segment_by, positive_threshold=3)
    named = {u: (AGE_NAMES_1M[a], g, OCCUPATIONS_1M[o], z) for u, (a, g, o, z) in users.items()}
    assert frame["segment"].tolist() == [named[u][{"age": 0, "occupation": 2}[segment_by]] for u, *_ in rows]
    assert frame["label"].tolist() == [float(r >= 3) for _, _, r, _ in rows]
    for column, values in expected_features(rows, named, genres).items():
        assert frame[column].tolist() == values, column
    assert (frame["timestamp"].to_numpy().astype("int64") == np.array([t for *_, t in rows]) * 10**9).all()
    assert schema.categorical == ML_FEATURES


def test_movielens_feature_choice_and_the_first_genre(tmp_path):
    rows, users, genres = write_1m(tmp_path / "ml-1m", seed=7)
    frame, schema = load_movielens(tmp_path / "ml-1m", features=("genre", "gender"))
    assert schema.categorical == ("genre", "gender") and schema.bags == ()
    assert list(frame.columns) == ["user", "item", "label", "segment", "timestamp", "genre", "gender"]
    assert frame["genre"].tolist() == [genres[i][0] for _, i, _, _ in rows]
    with pytest.raises(ValueError, match=r"load_movielens: features must be among .*got \['title'\]"):
        load_movielens(tmp_path / "ml-1m", features=("title",))


def test_movielens_genre_bags_reach_the_click_model(tmp_path):
    """The genre bag of each row, through the encoder and ClickBatches, pools exactly the rows of
    that movie's genres in the model's genre table, and its gradient reaches those rows only."""
    rows, users, genres = write_100k(tmp_path / "ml-100k", seed=8)
    frame, schema = load_movielens(tmp_path / "ml-100k")
    encoder = FeatureEncoder().fit(frame, schema)
    source = ClickBatches(encoder.transform(frame))
    index = torch.randperm(len(frame))[:40]
    dense, kjt = source.batch(index).args
    assert kjt.keys() == list(schema.sparse_features)
    names = encoder.vocabulary("genres")
    movies = [rows[k][1] for k in index.tolist()]
    assert kjt["genres"].lengths().tolist() == [len(genres[i]) for i in movies]
    assert kjt["age"].lengths().tolist() == [1] * 40
    offsets = kjt["genres"].offsets().tolist()
    values = kjt["genres"].values().tolist()
    assert [[names[v] for v in values[a:b]] for a, b in zip(offsets, offsets[1:])] == [genres[i] for i in movies]
    model = build_click_model(encoder.cardinalities, num_dense=1, embedding_dim=4, dense_arch=(8, 4), over_arch=(8,))
    table = model.sparse_arch.embedding_bag_collection.embedding_bags["t_genres"].weight
    pooled = model.sparse_arch.embedding_bag_collection(kjt).to_dict()["genres"]
    bags = [[names.index(g) for g in genres[i]] for i in movies]
    expected = torch.stack([table.double()[ids].sum(0) for ids in bags])
    # a float32 sum of k rows is within k·2⁻²⁴·Σ|row| of the exact (float64) sum, elementwise
    bound = torch.stack([len(ids) * 2**-24 * table.double()[ids].abs().sum(0) for ids in bags])
    assert bool(((pooled.double() - expected).abs() <= bound).all())
    assert any(len(ids) > 1 for ids in bags)  # several genres pooled, not only single rows
    model(dense, kjt).sum().backward()
    touched = sorted({names.index(g) for i in movies for g in genres[i]})
    assert (table.grad.abs().sum(1) > 0).nonzero().flatten().tolist() == touched


def _replace_line(path, number, text):
    lines = path.read_bytes().decode("latin-1").splitlines()
    lines[number - 1] = text
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))


@pytest.mark.parametrize(
    "file, line, text, message",
    [
        ("u.data", 5, "1\t2\t3", "u.data, line 5: expected 4 fields separated by '\\\\t'"),
        ("u.data", 7, "999\t2\t3\t880000000", "u.data, line 7: user 999 is not in .*u.user"),
        ("u.data", 2, "1\t2\t3\tyesterday", "u.data, line 2: field 'timestamp' must be an integer, got 'yesterday'"),
        ("u.user", 3, "3|old|M|writer|12345", "u.user, line 3: field 'age' must be an integer, got 'old'"),
    ],
)
def test_ml100k_errors_name_file_and_line(tmp_path, file, line, text, message):
    write_100k(tmp_path / "ml", seed=3)
    _replace_line(tmp_path / "ml" / file, line, text)
    with pytest.raises(ValueError, match=message):
        load_movielens(tmp_path / "ml")


def test_ml1m_errors_and_detection(tmp_path):
    write_1m(tmp_path / "ml", seed=4)
    _replace_line(tmp_path / "ml" / "users.dat", 4, "4::F::33::2::55555")
    with pytest.raises(ValueError, match=r"users.dat, line 4: unknown age code 33; known codes: \[1, 18"):
        load_movielens(tmp_path / "ml")
    with pytest.raises(FileNotFoundError, match="not a MovieLens folder"):
        load_movielens(tmp_path)
    with pytest.raises(ValueError, match="segment_by must be one of"):
        load_movielens(tmp_path / "ml", segment_by="zip")


def write_criteo(path, seed, n=50):
    """Random Criteo lines; returns (labels, dense ints or None [n, 13], hashes or '' [n, 26])."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    dense = [[None if rng.random() < 0.2 else int(rng.integers(-3, 5000)) for _ in range(13)] for _ in range(n)]
    cats = [["" if rng.random() < 0.15 else f"{int(rng.integers(0, 6)):08x}" for _ in range(26)] for _ in range(n)]
    text = "".join(
        "\t".join([str(labels[k])] + ["" if v is None else str(v) for v in dense[k]] + cats[k]) + "\n" for k in range(n)
    )
    if str(path).endswith(".gz"):
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return labels, dense, cats


@pytest.mark.parametrize("name, nrows", [("day.tsv", None), ("day.tsv.gz", 30)])
def test_criteo(tmp_path, name, nrows):
    labels, dense, cats = write_criteo(tmp_path / name, seed=5)
    frame, schema = load_criteo(tmp_path / name, nrows=nrows, segment="C9")
    n = nrows or len(labels)
    assert len(frame) == n and schema.user is None and schema.item is None and schema.timestamp is None
    assert schema.sparse_features == tuple(f"C{i}" for i in range(1, 27)) and schema.segment == "segment"
    assert frame["label"].tolist() == [float(v) for v in labels[:n]]
    expected_dense = np.array([[0.0 if v is None else max(v, 0) for v in row] for row in dense[:n]])
    np.testing.assert_array_equal(frame[[f"I{i}" for i in range(1, 14)]].to_numpy(), expected_dense)
    assert frame[[f"C{i}" for i in range(1, 27)]].to_numpy().tolist() == [row for row in cats[:n]]
    assert frame["segment"].tolist() == [row[8] for row in cats[:n]]
    encoded = FeatureEncoder().fit(frame, schema).transform(frame)
    assert encoded.dense.shape == (n, 13) and list(encoded.sparse) == list(schema.sparse_features)


@pytest.mark.parametrize(
    "line, edit, message",
    [
        (4, lambda f: f[:-1], "line 4: expected 40 tab-separated fields .*found 39"),
        (2, lambda f: ["2"] + f[1:], "line 2: column 'label' must be 0 or 1, got '2'"),
        (3, lambda f: f[:5] + ["abc"] + f[6:], "line 3: column 'I5' must be an integer or empty, got 'abc'"),
    ],
)
def test_criteo_errors_name_line_and_column(tmp_path, line, edit, message):
    path = tmp_path / "bad.tsv"
    write_criteo(path, seed=6, n=6)
    lines = path.read_text().splitlines()
    lines[line - 1] = "\t".join(edit(lines[line - 1].split("\t")))
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=f"bad.tsv, {message}"):
        load_criteo(path)


# ---- --categorical / --dense for every format (recpeft.datasets.sources) -----------------------


def source_path(tmp_path, fmt):
    """A small file or folder of format ``fmt`` (None for the embedded shop)."""
    if fmt == "movielens":
        write_100k(tmp_path / "ml", seed=9)
        return tmp_path / "ml"
    if fmt == "criteo":
        write_criteo(tmp_path / "day.tsv", seed=9, n=20)
        return tmp_path / "day.tsv"
    if fmt == "interactions":
        rng = np.random.default_rng(9)
        frame = pd.DataFrame(
            {
                "user": rng.integers(0, 9, 30),
                "item": rng.integers(0, 9, 30),
                "label": rng.integers(0, 2, 30),
                "segment": rng.choice(["DE", "FR"], 30),
                "timestamp": pd.date_range("2026-01-01", periods=30, freq="h").astype(str),
                "brand": rng.choice(["a", "b"], 30),
                "tags": rng.choice(["x|y", "y", "z|x|y"], 30),
                "price": rng.gamma(2.0, 3.0, 30),
            }
        )
        frame.to_csv(tmp_path / "log.csv", index=False)
        return tmp_path / "log.csv"
    return None


@pytest.mark.parametrize(
    "fmt, categorical, dense, bags",
    [
        ("shop", ("brand",), ("price",), ()),
        ("movielens", ("occupation", "genres"), (), ("genres",)),
        ("movielens", ("genre",), (), ()),
        ("criteo", ("C3", "C1"), ("I2",), ()),
        ("interactions", ("brand", "tags"), ("price",), ("tags",)),
    ],
)
def test_named_feature_columns_are_honoured(tmp_path, fmt, categorical, dense, bags):
    path = source_path(tmp_path, fmt)
    roles = Roles(categorical=categorical, dense=dense, bags=bags if fmt == "interactions" else ())
    frame, schema = load_source(path, fmt, roles)
    assert (schema.categorical, schema.dense, schema.bags) == (categorical, dense, bags)
    assert all(c in frame.columns for c in schema.columns)
    encoded = FeatureEncoder().fit(frame, schema).transform(frame)
    assert list(encoded.sparse) == list(schema.sparse_features) and encoded.dense.shape[1] == len(dense)
    for bag in bags:
        assert encoded.sparse[bag].dim() == 2 and bool((encoded.sparse[bag] >= 0).sum(1).gt(1).any())


@pytest.mark.parametrize(
    "fmt, categorical, dense",
    [
        ("shop", SHOP_SCHEMA.categorical, SHOP_SCHEMA.dense),
        ("movielens", ML_FEATURES, ()),
        ("criteo", tuple(f"C{i}" for i in range(1, 27)), tuple(f"I{i}" for i in range(1, 14))),
        ("interactions", (), ()),
    ],
)
def test_no_named_columns_give_the_formats_defaults(tmp_path, fmt, categorical, dense):
    _, schema = load_source(source_path(tmp_path, fmt), fmt, Roles())
    assert (schema.categorical, schema.dense) == (categorical, dense)


@pytest.mark.parametrize(
    "fmt, roles, message",
    [
        ("shop", Roles(categorical=("brand", "colour")), "--categorical brand,colour: the shop format has no column"),
        ("shop", Roles(dense=("rating",)), r"--dense rating: the shop format has no column\(s\) \['rating'\]"),
        ("movielens", Roles(categorical=("title",)), "--categorical title: the movielens format has no column"),
        ("movielens", Roles(dense=("age",)), "--dense age: the movielens format has no such columns; leave --dense"),
        ("movielens", Roles(categorical=("age",), bags=("genres",)), "Roles.bags genres: the movielens format"),
        ("criteo", Roles(categorical=("C27",)), r"--categorical C27: the criteo format .*it offers \['C1', "),
        ("criteo", Roles(dense=("I0",)), r"--dense I0: the criteo format has no column\(s\) \['I0'\]"),
        ("interactions", Roles(categorical=("colour",)), r"missing column\(s\) \['colour'\]"),
        ("interactions", Roles(dense=("rating",)), r"missing column\(s\) \['rating'\]"),
    ],
)
def test_columns_a_format_lacks_are_refused_in_one_line(tmp_path, fmt, roles, message):
    with pytest.raises(ValueError, match=message) as info:
        load_source(source_path(tmp_path, fmt), fmt, roles)
    assert "\n" not in str(info.value)
