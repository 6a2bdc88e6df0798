"""Checks shared by every layer, each raising one ValueError whose message names the argument,
file or key at fault. Torch is imported only by the tensor checks, inside them.

    check_int("TrainConfig.epochs", epochs, minimum=1)     # "TrainConfig.epochs must be a positive integer, got 0"
    check_positive_number("lr", lr)                        # finite and > 0
    check_fraction("lora_dropout", p, below_one=True)      # in [0, 1)
    check_bool("use_rslora", flag)                         # a real bool: "no" and 1 are refused
    check_adapter_name("fr")                               # no NUL, no path separator, not "." or ".."
    match = guarded_pattern("rank_pattern", "tower_fc")    # fullmatch with a time budget: no hang
    check_state_keys(tensors, expected, where=path)        # first missing, then first unexpected key
    check_state_shapes(tensors, expected, where=path)      # first key whose shape differs
    first_non_finite(tensors)                              # name of the first tensor holding NaN/inf
    data = read_json_object(path)                          # a dict, or "<path> is not valid JSON: ..."
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import regex


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


def check_bool(name: str, value) -> bool:
    """``value`` if it is ``True`` or ``False`` (a JSON boolean), else ValueError naming ``name``:
    the strings ``"no"``/``"false"`` and the numbers 0/1 are refused rather than read as truthy."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false (a boolean), got {value!r}")
    return value


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


def check_adapter_name(name) -> str:
    """``name`` if it can name an adapter: a non-empty string that is also a safe folder name and
    module-dict key — no NUL byte, no ``.`` (so neither ``.`` nor ``..``), no ``/`` or ``\\``
    (nor the platform's ``os.sep`` / ``os.altsep``); else ValueError naming it."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"adapter name must be a non-empty string, got {name!r}")
    bad = [c for c in ("\0", ".", "/", "\\", os.sep, os.altsep) if c and c in name]
    if bad:
        raise ValueError(
            f"adapter name {name!r} must not contain {bad[0]!r} (it names a folder and a module key: "
            "no NUL, '.', '/' or backslash)"
        )
    return name


# Time one user regex may spend matching over all the names it is tested against (one selection
# of modules). A name is under ~100 characters and a sane pattern takes microseconds on it, so this
# is a margin of 10^4 and more; a pattern that backtracks exponentially (``(?:\w|\w\w)*\.quer``
# on a 43-character name takes minutes) is refused after it instead of hanging the process. The
# ``regex`` module counts the time its matching runs: on a busy machine the wall time is longer.
PATTERN_SECONDS = 0.25


def compile_pattern(field: str, pattern) -> regex.Pattern:
    """``pattern`` compiled (the ``regex`` module, ``re``-compatible syntax), else ValueError naming
    ``field`` and the pattern."""
    if not isinstance(pattern, str):
        raise ValueError(f"{field} pattern must be a string, got {pattern!r}")
    try:
        return regex.compile(pattern)
    except (regex.error, OverflowError, RecursionError) as exc:
        raise ValueError(f"{field}: {pattern!r} is not a valid regex: {exc}") from None


def guarded_pattern(
    field: str, pattern: str, *, template: str = "{}", seconds: float = PATTERN_SECONDS, source: str | None = None
) -> Callable[[str], bool]:
    """A test ``name → bool`` that ``template.format(pattern)`` matches all of ``name``; all calls
    of one such test together may spend ``seconds`` of wall time, past which it raises a one-line
    ValueError naming the pattern, ``field`` and ``source`` (a file) when given."""
    compile_pattern(field, pattern)
    compiled = compile_pattern(field, template.format(pattern))
    spent = 0.0

    def matches(name: str) -> bool:
        nonlocal spent
        start = time.perf_counter()
        try:
            hit = compiled.fullmatch(name, timeout=max(seconds - spent, 1e-3)) is not None
        except TimeoutError:
            where = f"{source}: " if source else ""
            raise ValueError(
                f"{where}{field} regex {pattern!r} took over {seconds:g} s to match module names "
                f"(it was at {name!r}): it backtracks exponentially; use a simpler pattern or a list of names"
            ) from None
        spent += time.perf_counter() - start
        return hit

    return matches
