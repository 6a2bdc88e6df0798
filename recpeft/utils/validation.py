"""Checks shared by every layer, each raising one ValueError whose message names the argument,
file or key at fault. Torch is imported only by the tensor checks, inside them.

    check_int("TrainConfig.epochs", epochs, minimum=1)     # "TrainConfig.epochs must be a positive integer, got 0"
    check_positive_number("lr", lr)                        # finite and > 0
    check_fraction("lora_dropout", p, below_one=True)      # in [0, 1)
    check_state_keys(tensors, expected, where=path)        # first missing, then first unexpected key
    check_state_shapes(tensors, expected, where=path)      # first key whose shape differs
    first_non_finite(tensors)                              # name of the first tensor holding NaN/inf
    data = read_json_object(path)                          # a dict, or "<path> is not valid JSON: ..."
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path


def is_int(value) -> bool:
    """An int that is not a bool (``True`` is an int to Python, never a count to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int = 1) -> int:
    """``value`` if it is an integer ≥ ``minimum``, else ValueError naming ``name``."""
    if not is_int(value) or value < minimum:
        wanted = "a positive integer" if minimum == 1 else f"an integer ≥ {minimum}"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return value


def _is_real(value) -> bool:
    """An int or float that is not a bool (NaN and ±inf included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_number(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` if it is a finite real number > 0 (≥ 0 with ``allow_zero``), else ValueError."""
    ok = _is_real(value) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        wanted = "a finite number ≥ 0" if allow_zero else "a positive finite number"
        raise ValueError(f"{name} must be {wanted}, got {value!r}")
    return float(value)


def check_fraction(name: str, value, *, below_one: bool = False) -> float:
    """``value`` if it is a real number in [0, 1] ([0, 1) with ``below_one``: a dropout rate),
    else ValueError naming ``name``; NaN is refused."""
    ok = _is_real(value) and 0 <= value and (value < 1 if below_one else value <= 1)
    if not ok:
        raise ValueError(f"{name} must be in [0, 1{')' if below_one else ']'}, got {value!r}")
    return float(value)


def check_state_keys(
    present: Iterable[str],
    expected: Iterable[str],
    *,
    where: str,
    prefix: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error`` naming the first (sorted) key of ``expected`` missing from ``present``,
    else the first key of ``present`` not in ``expected``: ``"<where>: missing key <prefix><key>"``."""
    present, expected = set(present), set(expected)
    missing = sorted(expected - present)
    if missing:
        raise error(f"{where}: missing key {prefix}{missing[0]}")
    unexpected = sorted(present - expected)
    if unexpected:
        raise error(f"{where}: unexpected key {prefix}{unexpected[0]}")


def check_state_shapes(
    present: Mapping[str, object],
    expected: Mapping[str, object],
    *,
    where: str,
    prefix: str = "",
    error: type[Exception] = ValueError,
) -> None:
    """Raise ``error`` for the first key of ``expected`` (in its order) whose tensor in ``present``
    has another shape: ``"<where>: <prefix><key> has shape (a, b) but the model expects (c, d)"``.
    Values are tensors or shapes; keys missing from ``present`` are :func:`check_state_keys`' job."""
    for key, want in expected.items():
        if key in present:
            got, want = tuple(getattr(present[key], "shape", present[key])), tuple(getattr(want, "shape", want))
            if got != want:
                raise error(f"{where}: {prefix}{key} has shape {got} but the model expects {want}")


def first_non_finite(tensors: Mapping[str, object]) -> str | None:
    """The name of the first floating-point tensor of ``tensors`` holding NaN or ±inf, or None."""
    import torch

    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def parse_json_object(text: str, source: str) -> dict:
    """``text`` parsed as JSON, which must be an object; ValueError naming ``source`` otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object")
    return data


def read_json_object(path: str | Path) -> dict:
    """The JSON object in the file ``path`` (see :func:`parse_json_object`); an undecodable file
    is a ValueError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from None
    return parse_json_object(text, str(path))
