"""A run's settings as a TOML file: ``recpeft <command> --config run.toml`` reads one, and every
command that writes an output writes the settings it ran with (``run.toml``) beside it, so any
run can be repeated exactly: ``recpeft pretrain --config base/run.toml --output base-again``.

The file is one flat table, a key per flag (``batch-size = 512``; dashes or underscores), each
value a string, integer, float, boolean or array of strings. Reading uses the standard library's
``tomllib`` (Python ≥ 3.11; the ``tomli`` package, its origin, on 3.10); writing needs no
library, since only those five kinds of value are written (:func:`toml_text`).

Example::

    text = toml_text({"epochs": 3, "lr": 0.003, "exclude-segments": ["PL"]}, "recpeft pretrain")
    read_run_config(path) == {"epochs": 3, "lr": 0.003, "exclude-segments": ["PL"]}
"""

from __future__ import annotations

import math
import re
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

#: the name of the settings file a command writes into its output folder
RUN_CONFIG = "run.toml"
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def read_run_config(path: str | Path) -> dict:
    """The table of the TOML file at ``path``; a missing or malformed file is a ValueError
    naming it (and, for a syntax error, the line and column tomllib gives)."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        raise ValueError(f"--config {path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"--config {path}: a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path}: not valid TOML: {' '.join(str(exc).split())}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--config {path}: not UTF-8 text") from None


def _string(text: str) -> str:
    """``text`` as a TOML basic string: quote and backslash escaped, control characters (and DEL)
    as \\uXXXX, everything else as it is."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            out.append(f"\\u{ord(char):04X}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _value(value, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)  # the shortest text that reads back as this float
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return "[" + ", ".join(_string(v) for v in value) + "]"
    raise TypeError(f"run config key {key!r}: cannot write {type(value).__name__} {value!r} as TOML")


def toml_text(settings: dict, title: str) -> str:
    """``settings`` (key → str, int, float, bool or list of str) as a TOML table, after a comment
    naming ``title`` (the command that ran)."""
    lines = [f"# {title}: the settings of this run; repeat it with `{title} --config <this file>`"]
    for key, value in settings.items():
        if not _BARE_KEY.fullmatch(key):
            raise ValueError(f"run config key {key!r} is not a bare TOML key")
        lines.append(f"{key} = {_value(value, key)}")
    return "\n".join(lines) + "\n"
