"""The rows of a scoring request, checked against the columns a base reads, as a DataFrame.

A request body is the JSON object ``{"rows": [{column: value, ...}, ...]}``. Every row holds
exactly the base's scoring columns (:func:`recpeft.apps.scoring.scoring_schema`: its sparse id
columns, its dense columns and its segment column; no label, no timestamp), each of its kind:

    sparse id (user, item, categorical)   an integer or a string (``126`` and ``"126"`` are one id,
                                          as the encoder reads them; an id the base never saw
                                          scores with its out-of-vocabulary row)
    dense                                 a finite number
    segment                               a string: the adapter that scores the row (leading and
                                          trailing blanks are dropped; no such adapter: the base)

Anything else is a :class:`RequestError` with a one-line message naming the row and the column:
413 for more than ``max_rows`` rows, 422 otherwise.

Example::

    reader = RowReader(scoring_schema(bank.encoder.schema), max_rows=1024)
    frame = reader.frame(reader.parse(body_bytes))
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from recpeft.datasets import Schema
from recpeft.utils.validation import is_int

#: how many characters of a bad value a message shows
SHOWN_CHARS = 40


class RequestError(ValueError):
    """A request the server refuses: ``status`` (an HTTP 4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def shown(value) -> str:
    """``value`` as JSON, cut to :data:`SHOWN_CHARS` characters."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 1] + "…"


def parse_object(body: bytes, what: str) -> dict:
    """``body`` as a JSON object; RequestError 422 naming ``what`` when it is not one."""
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise RequestError(422, f"{what}: the body is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise RequestError(422, f"{what}: the body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise RequestError(422, f"{what}: the body must be a JSON object, got {shown(data)}")
    return data


def _id(value) -> bool:
    return is_int(value) or isinstance(value, str)


def _number(value) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _text(value) -> bool:
    return isinstance(value, str)


#: kind of column → (its check, what the message says it must be)
KINDS: dict[str, tuple[Callable[[object], bool], str]] = {
    "id": (_id, "an integer or string id"),
    "dense": (_number, "a finite number"),
    "segment": (_text, "a string (the segment, which names the adapter)"),
}


@dataclass(frozen=True)
class RowReader:
    """Checks request rows against ``schema`` (the base's scoring columns) and builds their
    DataFrame; at most ``max_rows`` rows a request."""

    schema: Schema
    max_rows: int

    @property
    def kinds(self) -> dict[str, str]:
        """column → kind (see :data:`KINDS`), in the schema's column order."""
        kinds = {c: "id" for c in self.schema.sparse_features}
        kinds.update({c: "dense" for c in self.schema.dense})
        if self.schema.segment:
            kinds[self.schema.segment] = "segment"
        return kinds

    def parse(self, body: bytes) -> list:
        """The ``rows`` list of a request body (see the module docstring)."""
        data = parse_object(body, "POST /score")
        unknown = sorted(set(data) - {"rows"})
        if unknown:
            raise RequestError(422, f'POST /score: unknown field {unknown[0]!r}; the body is {{"rows": [...]}}')
        if "rows" not in data:
            raise RequestError(422, 'POST /score: no "rows" field; the body is {"rows": [{column: value, ...}, ...]}')
        rows = data["rows"]
        if not isinstance(rows, list):
            raise RequestError(422, f'POST /score: "rows" must be a list of objects, got {shown(rows)}')
        if len(rows) > self.max_rows:
            raise RequestError(413, f"POST /score: {len(rows)} rows, at most {self.max_rows} per request")
        return rows

    def frame(self, rows: list) -> pd.DataFrame:
        """The DataFrame of ``rows`` (a list of objects), one column per scoring column; the
        first bad row, missing or unknown column or value is refused, naming it."""
        kinds = self.kinds
        columns = list(kinds)
        expected = set(columns)
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise RequestError(422, f"rows[{i}]: a row must be an object of column: value, got {shown(row)}")
            if row.keys() != expected:
                missing = [c for c in columns if c not in row]
                if missing:
                    raise RequestError(422, f"rows[{i}]: missing column {missing[0]!r}; the base reads {columns}")
                unknown = sorted(set(row) - expected)
                raise RequestError(422, f"rows[{i}]: unknown column {unknown[0]!r}; the base reads {columns}")
        data = {}
        for column, kind in kinds.items():
            values = [row[column] for row in rows]
            check, wanted = KINDS[kind]
            for i, value in enumerate(values):
                if not check(value):
                    raise RequestError(422, f"rows[{i}].{column}: must be {wanted}, got {shown(value)}")
            data[column] = [v.strip() for v in values] if kind == "segment" else values
        return pd.DataFrame(data, columns=columns)
