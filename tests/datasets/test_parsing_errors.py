"""Bad files give one line naming the file (and the column and row where one is at fault), never a
raw pandas / pyarrow message."""

import gzip

import numpy as np
import pandas as pd
import pytest

from recpeft.datasets import Schema, load_interactions

SCHEMA = Schema(user="user", item="item", label="label", segment="market", timestamp="time", dense=("price",))


def _log(n: int = 6) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "user": rng.integers(0, 9, n),
            "item": rng.integers(0, 9, n),
            "label": rng.integers(0, 2, n),
            "market": rng.choice(["DE", "FR"], n),
            "time": ["2026-01-02"] * n,
            "price": rng.random(n),
        }
    )


def _parquet_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    _log().to_parquet(buffer)
    return buffer.getvalue()


def _gzip(text: str) -> bytes:
    return gzip.compress(text.encode())


BAD_FILES = {
    # name: (file name, bytes, the message after "<path>: ")
    "corrupt parquet": ("log.parquet", b"PAR1" + bytes(range(200)) + b"PAR1", "not a valid Parquet file: "),
    "truncated parquet": ("log.parquet", _parquet_bytes()[:300] + b"PAR1", "not a valid Parquet file: "),
    "wrong delimiter": (
        "log.csv",
        _log().to_csv(index=False, sep=";").encode(),
        "the header is one column 'user;item;label;market;time;price'; the file seems to be separated by ';'",
    ),
    "tab delimiter": (
        "log.csv",
        _log().to_csv(index=False, sep="\t").encode(),
        "the header is one column 'user\\titem\\tlabel\\tmarket\\ttime\\tprice'; "
        "the file seems to be separated by '\\t'",
    ),
    "binary file": ("log.csv", bytes(range(256)) * 8, "not a CSV text file (it holds NUL bytes"),
    "utf-16": ("log.csv", _log().to_csv(index=False).encode("utf-16"), "the CSV file is UTF-16 text"),
    "not gzip": ("log.csv.gz", _log().to_csv(index=False).encode(), "not a valid CSV file: Not a gzipped file"),
    "ragged rows": (
        "log.csv",
        b"user,item,label,market,time,price\n1,2,0,DE,2026-01-02,1\n1,2,0,DE,2026-01-02,1,7,7\n",
        "not a valid CSV file: Error tokenizing data. C error: Expected 6 fields in line 3, saw 8",
    ),
    "empty file": ("log.csv", b"", "the file is empty (no header, no rows)"),
    "empty gzip": ("log.csv.gz", _gzip(""), "the file is empty (no header, no rows)"),
    "blank lines": ("log.csv", b"\n\n\n", "the file is empty (no header, no rows)"),
    "header only": ("log.csv", b"user,item,label,market,time,price\n", "no data rows"),
    "mixed dense": (
        "log.csv",
        _log().astype({"price": object}).assign(price=[1, "x", 2, 3, 4, 5]).to_csv(index=False).encode(),
        "column 'price', row 2: the dense value must be a finite number, got 'x'",
    ),
    "dense NaN text": (
        "log.csv",
        _log().astype({"price": object}).assign(price=[1, "NaN", 2, 3, 4, 5]).to_csv(index=False).encode(),
        "column 'price', row 2: the dense value must be a finite number, got 'NaN'",
    ),
    "NaN label": (
        "log.csv",
        _log().assign(label=[0, 1, np.nan, 0, 1, 0]).to_csv(index=False).encode(),
        "column 'label', row 3: the label is missing",
    ),
    "bad time": (
        "log.csv",
        _log().assign(time=["2026-01-02"] * 4 + ["yesterday", "2026-01-02"]).to_csv(index=False).encode(),
        "column 'time', row 5: cannot read the timestamp 'yesterday'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_give_one_line_naming_the_file(tmp_path, case):
    name, data, message = BAD_FILES[case]
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError) as caught:
        load_interactions(path, SCHEMA)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith(f"{path}: {message}"), text


def test_parquet_label_nan_and_time_bool_name_the_column(tmp_path):
    path = tmp_path / "log.parquet"
    _log().assign(label=[0.0, 1.0, None, 0.0, 1.0, 0.0]).to_parquet(path)
    with pytest.raises(ValueError, match=rf"^{path}: column 'label', row 3: the label is missing$"):
        load_interactions(path, SCHEMA)
    _log().assign(time=[True] * 6).to_parquet(path)
    with pytest.raises(ValueError, match=rf"^{path}: column 'time', row 1: booleans are not timestamps"):
        load_interactions(path, SCHEMA)


def test_an_id_column_of_mixed_types_is_one_canonical_type():
    """ints, integral floats and text in one object column: each value by its canonical text."""
    frame = _log().astype({"user": object})
    frame["user"] = [1, "1", 1.0, "a", "01", 2.5]
    loaded = load_interactions(frame, SCHEMA)
    assert loaded["user"].tolist() == ["1", "1", "1", "a", "01", "2.5"]


@pytest.mark.parametrize(
    "name, data, message",
    [
        ("day.tsv.gz", b"0\t1\n", "cannot read the file: Not a gzipped file"),
        ("day.tsv.gz", gzip.compress(b"0\t1\n" * 100)[:-12], "cannot read the file: "),
        ("day.tsv", bytes(range(256)) * 4, "not a UTF-8 text file (byte 128"),
    ],
)
def test_bad_criteo_files_give_one_line_naming_the_file(tmp_path, name, data, message):
    from recpeft.datasets import load_criteo

    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(ValueError) as caught:
        load_criteo(path)
    assert str(caught.value).startswith(f"{path}: {message}") and "\n" not in str(caught.value)
