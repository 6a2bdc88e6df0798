"""MovieLens (ML-100K, ML-1M) and Criteo TSV readers, on small random files written here."""

import gzip

import numpy as np
import pandas as pd
import pytest

from recpeft.datasets import FeatureEncoder, load_criteo, load_movielens

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


def write_100k(folder, seed):
    """Returns (ratings, users {id: (age, gender, occupation)}, first genre {item: name})."""
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = ratings(rng, 12, 15)
    (folder / "u.data").write_text("".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows))
    users = {
        u: (int(rng.integers(7, 74)), str(rng.choice(["M", "F"])), str(rng.choice(["writer", "technician", "student"])))
        for u in range(1, 13)
    }
    (folder / "u.user").write_text("".join(f"{u}|{a}|{g}|{o}|{10000 + u}\n" for u, (a, g, o) in users.items()))
    genre, lines = {}, []
    for item in range(1, 16):
        flags = (rng.random(19) < 0.2).astype(int)
        genre[item] = GENRES_100K[int(np.flatnonzero(flags)[0])] if flags.any() else "unknown"
        lines.append(
            f"{item}|Film {item} ({1990 + item})|01-Jan-{1990 + item}||http://x/{item}|"
            + "|".join(map(str, flags))
            + "\n"
        )
    (folder / "u.item").write_bytes("".join(lines).replace("Film 3", "Café 3").encode("latin-1"))
    return rows, users, genre


def write_1m(folder, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    rows = ratings(rng, 10, 14)
    (folder / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    users = {
        u: (int(rng.choice(list(AGE_NAMES_1M))), str(rng.choice(["M", "F"])), int(rng.integers(0, 21)))
        for u in range(1, 11)
    }
    (folder / "users.dat").write_text("".join(f"{u}::{g}::{a}::{o}::{20000 + u}\n" for u, (a, g, o) in users.items()))
    genre, lines = {}, []
    for item in range(1, 15):
        names = list(rng.choice(GENRES_100K[1:], size=int(rng.integers(1, 4)), replace=False))
        genre[item] = names[0]
        lines.append(f"{item}::Película {item} ({1990 + item})::{'|'.join(names)}\n")
    (folder / "movies.dat").write_bytes("".join(lines).encode("latin-1"))
    return rows, users, genre


@pytest.mark.parametrize("segment_by", ["gender", "age", "occupation"])
def test_ml100k(tmp_path, segment_by):
    rows, users, genre = write_100k(tmp_path / "ml-100k", seed=1)
    frame, schema = load_movielens(tmp_path / "ml-100k", segment_by=segment_by)
    assert schema.sparse_features == ("user", "item", "genre") and schema.segment == "segment"
    attribute = {
        "age": lambda u: bucket(users[u][0]),
        "gender": lambda u: users[u][1],
        "occupation": lambda u: users[u][2],
    }[segment_by]
    assert frame["user"].tolist() == [u for u, _, _, _ in rows]
    assert frame["item"].tolist() == [i for _, i, _, _ in rows]
    assert frame["label"].tolist() == [float(r >= 4) for _, _, r, _ in rows]
    assert frame["segment"].tolist() == [attribute(u) for u, _, _, _ in rows]
    assert frame["genre"].tolist() == [genre[i] for _, i, _, _ in rows]
    assert frame["timestamp"].tolist() == [pd.Timestamp(t, unit="s") for _, _, _, t in rows]
    encoder = FeatureEncoder().fit(frame, schema)
    assert encoder.cardinalities["user"] == len({u for u, _, _, _ in rows}) + 1


@pytest.mark.parametrize("segment_by", ["age", "occupation"])
def test_ml1m(tmp_path, segment_by):
    rows, users, genre = write_1m(tmp_path / "ml-1m", seed=2)
    frame, _ = load_movielens(tmp_path / "ml-1m", segment_by=segment_by, positive_threshold=3)
    name = {"age": lambda u: AGE_NAMES_1M[users[u][0]], "occupation": lambda u: OCCUPATIONS_1M[users[u][2]]}[segment_by]
    assert frame["segment"].tolist() == [name(u) for u, _, _, _ in rows]
    assert frame["label"].tolist() == [float(r >= 3) for _, _, r, _ in rows]
    assert frame["genre"].tolist() == [genre[i] for _, i, _, _ in rows]
    assert (frame["timestamp"].to_numpy().astype("int64") == np.array([t for *_, t in rows]) * 10**9).all()


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
