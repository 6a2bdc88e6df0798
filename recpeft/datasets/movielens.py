"""MovieLens directories (GroupLens formats) as an interaction table segmented by a user attribute.

ML-100K: ``u.data``  user \\t item \\t rating \\t timestamp
         ``u.user``  user|age|gender|occupation|zip
         ``u.item``  item|title|release date|video release date|IMDb URL|19 genre flags (latin-1)
ML-1M:   ``ratings.dat`` UserID::MovieID::Rating::Timestamp
         ``users.dat``   UserID::Gender::Age::Occupation::Zip-code (age and occupation as codes)
         ``movies.dat``  MovieID::Title::Genres, genres joined by ``|`` (latin-1)

The result has one row per rating: label = 1 when rating ≥ ``positive_threshold``, segment = the
user's gender ("F"/"M"), age bucket (ML-1M's buckets, "Under 18" … "56+"; ML-100K's raw ages are
put in the same buckets) or occupation name, the movie's first genre as a categorical feature,
and the rating time (epoch seconds) as the timestamp.

Example::

    frame, schema = load_movielens("ml-100k", segment_by="occupation")
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pandas as pd

from .interactions import validate_frame
from .schema import Schema

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
SCHEMA = Schema(
    user="user", item="item", label="label", segment="segment", timestamp="timestamp", categorical=("genre",)
)


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
    first = np.where(flags.any(axis=1), flags.argmax(axis=1), 0)
    items["genre"] = [ML100K_GENRES[k] for k in first]
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
    items["genre"] = [g.split("|")[0] if g.strip() else "unknown" for g in items["genres"]]
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
    directory: str | Path, *, segment_by: str = "gender", positive_threshold: float = 4
) -> tuple[pd.DataFrame, Schema]:
    """Read an ML-100K or ML-1M directory (detected by ``u.data`` / ``ratings.dat``).

    Args:
        directory: the unpacked data set folder.
        segment_by: "gender", "age" or "occupation": the user attribute that names segments.
        positive_threshold: label = rating ≥ this.

    Returns:
        (frame, schema): columns user, item, label (float32), segment (str), timestamp
        (datetime64[ns]), genre (str); ``schema`` names them.
    """
    if segment_by not in SEGMENT_ATTRIBUTES:
        raise ValueError(f"load_movielens: segment_by must be one of {SEGMENT_ATTRIBUTES}, got {segment_by!r}")
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
    frame = pd.DataFrame(
        {
            "user": user_ids,
            "item": item_ids,
            "label": (rating >= positive_threshold).astype(np.float32),
            "segment": users[segment_by].str.strip().to_numpy()[user_row],
            "timestamp": pd.to_datetime(stamps, unit="s"),
            "genre": items["genre"].to_numpy()[item_row],
        }
    )
    return validate_frame(frame, SCHEMA, str(paths["ratings"])), SCHEMA
