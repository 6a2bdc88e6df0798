"""Package attributes imported on first use (PEP 562), so that importing a package for one
light name does not import torch, pandas or torchrec.

    __getattr__, __dir__ = lazy_exports(__name__, {"Trainer": ".train", "LoraConfig": ".peft"})
"""

from __future__ import annotations

import importlib
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: attribute ``name`` is ``exports[name]`` (a
    module path, relative to ``package`` when it starts with a dot), imported when first read."""

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name], package), name)
        globals_of_package = importlib.import_module(package).__dict__
        globals_of_package[name] = value  # later reads skip this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(importlib.import_module(package).__dict__) | set(exports))

    return __getattr__, __dir__
