"""MovieLens directories (GroupLens formats) as an interaction table segmented by a user attribute.

ML-100K: ``u.data``  user \\t item \\t rating \\t timestamp
         ``u.user``  user|age|gender|occupation|zip
         ``u.item``  item|title|release date|video release date|IMDb URL|19 genre flags (latin-1)
ML-1M:   ``ratings.dat`` UserID::MovieID::Rating::Timestamp
         ``users.dat``   UserID::Gender::Age::Occupation::Zip-code (age and occupation as codes)
         ``movies.dat``  MovieID::Title::Genres, genres joined by ``|`` (latin-1)

The result has one row per rating: label = 1 when rating ≥ ``positive_threshold``, segment = the
user's gender ("F"/"M"), age bucket or occupation name (``segment_by``), the rating time (epoch
seconds) as the timestamp, and these categorical features (:data:`FEATURES`, all by default):

- ``age``: ML-1M's age bucket ("Under 18", "18-24" … "56+"); ML-100K's ages in years are put in
  the same buckets;
- ``gender``: "F" / "M";
- ``occupation``: its name (ML-1M's codes 0–20 named as its README names them);
- ``zip_prefix``: the zip code's first character (upper case; "unknown" when empty). One
  character: a US ZIP's first digit is one of ten national areas (0 New England … 9 the West
  Coast) and a Canadian postal code's first letter its province or region, so every value is
  shared by many users; a three-character prefix splits the users into hundreds of groups of a
  handful each, which would mostly repeat the user id and leave a new user's prefix unseen;
- ``genres``: every genre of the movie, as a bag (``Schema.bags``: ``"Action|Thriller"``, one
  pooled embedding over all of them); "unknown" for a movie with none;
- ``genre``: the first genre only (not in the default set; the feature of bases made before
  the bag existed).

Example::

    frame, schema = load_movielens("ml-100k", segment_by="occupation")
    frame, schema = load_movielens("ml-1m", features=("age", "genres"))
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from .formats import MOVIELENS_DEFAULT_FEATURES, MOVIELENS_FEATURES
from .interactions import validate_frame
from .schema import BAG_SEPARATOR, Schema

AGE_BUCKETS = {1: "Under 18", 18: "18-24", 25: "25-34", 35: "35-44", 45: "45-49", 50: "50-55", 56: "56+"}
ML1M_OCCUPATIONS = (
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
)
ML100K_GENRES = (
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
)
SEGMENT_ATTRIBUTES = ("gender", "age", "occupation")
#: the categorical features a MovieLens folder offers, and those it gives by default
FEATURES, DEFAULT_FEATURES = MOVIELENS_FEATURES, MOVIELENS_DEFAULT_FEATURES
BAG_FEATURES = ("genres",)
ZIP_PREFIX_LENGTH = 1  # characters of the zip code kept (see the module docstring)
UNKNOWN = "unknown"


def movielens_schema(features: tuple[str, ...] = DEFAULT_FEATURES) -> Schema:
    """The schema of :func:`load_movielens` with the categorical ``features`` (in that order)."""
    if isinstance(features, str):
        raise ValueError(f"load_movielens: features must be a sequence of names, got the string {features!r}")
    features = tuple(features)
    if any(f not in FEATURES for f in features):
        raise ValueError(f"load_movielens: features must be among {FEATURES}, got {list(features)}")
    return Schema(
        user="user",
        item="item",
        label="label",
        segment="segment",
        timestamp="timestamp",
        categorical=features,
        bags=tuple(f for f in features if f in BAG_FEATURES),
    )


SCHEMA = movielens_schema()


def _read_table(path: Path, sep: str, names: tuple[str, ...], encoding: str = "latin-1") -> pd.DataFrame:
    """Split every non-blank line of ``path`` at ``sep`` into exactly len(names) string fields;
    the column ``line`` holds each row's 1-based line number."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    everything = path.read_text(encoding=encoding).splitlines()
    numbers = np.array([k for k, line in enumerate(everything, start=1) if line.strip()], dtype=np.int64)
    if not numbers.size:
        raise ValueError(f"{path}: the file has no data lines")
    lines = [everything[k - 1] for k in numbers]
    fields = np.array([line.count(sep) for line in lines]) + 1
    bad = np.flatnonzero(fields != len(names))
    if bad.size:
        raise ValueError(
            f"{path}, line {numbers[bad[0]]}: expected {len(names)} fields separated by {sep!r} "
            f"({', '.join(names)}), found {fields[bad[0]]}"
        )
    text = "\n".join(lines)
    if len(sep) > 1:  # the C parser takes one-character separators; \x1f (unit separator) is never in the data
        text = text.replace(sep, "\x1f")
    frame = pd.read_csv(
        io.StringIO(text),
        sep=sep if len(sep) == 1 else "\x1f",
        header=None,
        names=list(names),
        dtype=str,
        keep_default_na=False,
        na_filter=False,
        quoting=csv.QUOTE_NONE,
    )
    frame["line"] = numbers
    return frame


def _ints(frame: pd.DataFrame, column: str, path: Path) -> np.ndarray:
    """``frame[column]`` as int64; a field that is not an integer is an error naming file and line."""
    try:
        return frame[column].to_numpy(dtype=str).astype(np.int64)  # fast path: every field is an integer
    except ValueError:
        pass
    numbers = pd.to_numeric(frame[column].str.strip(), errors="coerce")
    bad = np.flatnonzero(~(np.isfinite(numbers.to_numpy(dtype="float64")) & (numbers == np.round(numbers))))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{path}, line {frame['line'].iloc[row]}: field {column!r} must be an integer, "
            f"got {frame[column].iloc[row]!r}"
        )
    return numbers.to_numpy().astype(np.int64)


def _age_bucket(age: int) -> str:
    """ML-1M's age bucket for an age in years (ML-1M's codes are the buckets' lower bounds)."""
    return AGE_BUCKETS[max(k for k in AGE_BUCKETS if k <= max(age, 1))]


def _genres(names: list[list[str]]) -> tuple[list[str], list[str]]:
    """(first genre, the bag of all of them) per movie; "unknown" for a movie without any."""
    names = [[n for n in genres if n] or [UNKNOWN] for genres in names]
    return [genres[0] for genres in names], [BAG_SEPARATOR.join(genres) for genres in names]


def _ml100k(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Path]]:
    paths = {"ratings": directory / "u.data", "users": directory / "u.user", "items": directory / "u.item"}
    ratings = _read_table(paths["ratings"], "\t", ("user", "item", "rating", "timestamp"))
    users = _read_table(paths["users"], "|", ("user", "age", "gender", "occupation", "zip"))
    items = _read_table(paths["items"], "|", ("item", "title", "date", "video_date", "url") + ML100K_GENRES)
    users["age"] = [_age_bucket(a) for a in _ints(users, "age", paths["users"])]
    flags = np.stack([_ints(items, g, paths["items"]) for g in ML100K_GENRES], axis=1)
    bad = np.flatnonzero(~np.isin(flags, (0, 1)).all(axis=1))
    if bad.size:
        raise ValueError(f"{paths['items']}, line {items['line'].iloc[bad[0]]}: genre flags must be 0 or 1")
    items["genre"], items["genres"] = _genres([[ML100K_GENRES[k] for k in np.flatnonzero(row)] for row in flags])
    return ratings, users, items, paths


def _ml1m(directory: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame, dict[str, Path]]:
    paths = {"ratings": directory / "ratings.dat", "users": directory / "users.dat", "items": directory / "movies.dat"}
    ratings = _read_table(paths["ratings"], "::", ("user", "item", "rating", "timestamp"))
    users = _read_table(paths["users"], "::", ("user", "gender", "age", "occupation", "zip"))
    items = _read_table(paths["items"], "::", ("item", "title", "genres"))
    ages = _ints(users, "age", paths["users"])
    occupations = _ints(users, "occupation", paths["users"])
    for codes, column, known in ((ages, "age", AGE_BUCKETS), (occupations, "occupation", range(len(ML1M_OCCUPATIONS)))):
        bad = np.flatnonzero(~np.isin(codes, list(known)))
        if bad.size:
            raise ValueError(
                f"{paths['users']}, line {users['line'].iloc[bad[0]]}: unknown {column} code "
                f"{int(codes[bad[0]])}; known codes: {list(known)}"
            )
    users["age"] = [AGE_BUCKETS[a] for a in ages]
    users["occupation"] = [ML1M_OCCUPATIONS[o] for o in occupations]
    items["genre"], items["genres"] = _genres([g.strip().split("|") for g in items["genres"]])
    return ratings, users, items, paths


def _lookup(
    ratings: pd.DataFrame, keys: np.ndarray, table_keys: np.ndarray, what: str, ratings_path: Path, table_path: Path
) -> np.ndarray:
    """Row of ``table_keys`` for every rating's key; a key missing there is an error."""
    if len(np.unique(table_keys)) != len(table_keys):
        raise ValueError(f"{table_path}: {what} ids repeat")
    position = pd.Index(table_keys).get_indexer(keys)
    missing = np.flatnonzero(position < 0)
    if missing.size:
        row = int(missing[0])
        raise ValueError(
            f"{ratings_path}, line {ratings['line'].iloc[row]}: {what} {int(keys[row])} is not in {table_path}"
        )
    return position


def load_movielens(
    directory: str | Path,
    *,
    segment_by: str = "gender",
    positive_threshold: float = 4,
    features: tuple[str, ...] = DEFAULT_FEATURES,
) -> tuple[pd.DataFrame, Schema]:
    """Read an ML-100K or ML-1M directory (detected by ``u.data`` / ``ratings.dat``).

    Args:
        directory: the unpacked data set folder.
        segment_by: "gender", "age" or "occupation": the user attribute that names segments.
        positive_threshold: label = rating ≥ this.
        features: the categorical features to keep, among :data:`FEATURES` (see the module
            docstring); default all but ``genre``.

    Returns:
        (frame, schema): columns user, item (int64), label (float32), segment (str), timestamp
        (datetime64[ns]) and the ``features`` (str; ``genres`` a bag ``"A|B"``); ``schema`` names
        them.
    """
    if segment_by not in SEGMENT_ATTRIBUTES:
        raise ValueError(f"load_movielens: segment_by must be one of {SEGMENT_ATTRIBUTES}, got {segment_by!r}")
    schema = movielens_schema(features)
    directory = Path(directory)
    if (directory / "u.data").exists():
        ratings, users, items, paths = _ml100k(directory)
    elif (directory / "ratings.dat").exists():
        ratings, users, items, paths = _ml1m(directory)
    else:
        raise FileNotFoundError(
            f"{directory}: not a MovieLens folder (expected u.data, u.user and u.item for "
            "ML-100K, or ratings.dat, users.dat and movies.dat for ML-1M)"
        )
    user_ids, item_ids = _ints(ratings, "user", paths["ratings"]), _ints(ratings, "item", paths["ratings"])
    rating = pd.to_numeric(ratings["rating"].str.strip(), errors="coerce").to_numpy(dtype="float64")
    bad = np.flatnonzero(~np.isfinite(rating))
    if bad.size:
        raise ValueError(
            f"{paths['ratings']}, line {ratings['line'].iloc[bad[0]]}: rating must be a number, "
            f"got {ratings['rating'].iloc[bad[0]]!r}"
        )
    stamps = _ints(ratings, "timestamp", paths["ratings"])
    user_row = _lookup(
        ratings, user_ids, _ints(users, "user", paths["users"]), "user", paths["ratings"], paths["users"]
    )
    item_row = _lookup(
        ratings, item_ids, _ints(items, "item", paths["items"]), "item", paths["ratings"], paths["items"]
    )
    for column in ("age", "gender", "occupation"):
        users[column] = users[column].str.strip()
    zips = users["zip"].str.strip().str[:ZIP_PREFIX_LENGTH].str.upper()
    users["zip_prefix"] = zips.where(zips != "", UNKNOWN)
    attributes = {f: (users if f in users.columns else items)[f].to_numpy() for f in schema.categorical}
    frame = pd.DataFrame(
        {
            "user": user_ids,
            "item": item_ids,
            "label": (rating >= positive_threshold).astype(np.float32),
            "segment": users[segment_by].to_numpy()[user_row],
            "timestamp": pd.to_datetime(stamps, unit="s"),
            **{f: values[user_row if f in users.columns else item_row] for f, values in attributes.items()},
        }
    )
    return validate_frame(frame, schema, str(paths["ratings"])), schema
