"""Which modules an adapter wraps: ``target_modules`` / ``exclude_modules`` / ``modules_to_save``
matched against a model's module names, with errors that name what the user could have meant.

Rules (HF PEFT's): a list entry that is a string matches a module whose full name equals it or
ends with ``"." + entry``; a class matches instances; a plain string is a regex that must match
the whole name. Modules already wrapped by recpeft match as the module they wrap.
"""

from __future__ import annotations

import difflib
import re
from typing import Iterator

from torch import nn

from .layers import LORA_WRAPPERS, LoraLayer, ModulesToSaveWrapper, wrapper_for

_LIST_LIMIT = 12


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every named module, seeing a LoRA layer as its base layer and skipping
    the insides of recpeft's wrappers."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, LoraLayer):
            inside.append(name + ".")
            yield name, module.base_layer
        elif isinstance(module, ModulesToSaveWrapper):
            inside.append(name + ".")
            yield name, module.original_module
        else:
            yield name, module


def _entry_matches(entry, name: str, module: nn.Module) -> bool:
    if isinstance(entry, type):
        return isinstance(module, entry)
    return name == entry or name.endswith("." + entry)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", … ({len(names)} in all)" if len(names) > _LIST_LIMIT else "")


def _no_match_error(kind: str, entry, adaptable: list[str], all_names: list[str]) -> ValueError:
    label = entry.__name__ if isinstance(entry, type) else entry
    close = difflib.get_close_matches(str(label), all_names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    return ValueError(f"{kind} entry {label!r} matched no module.{hint} Adaptable modules: {_listing(adaptable)}")


def match_modules(model: nn.Module, spec, kind: str, *, require_each: bool = True) -> list[str]:
    """Names of the modules ``spec`` selects; each list entry (or the regex) must match something."""
    if spec is None:
        return []
    modules = list(iter_modules(model))
    all_names = [n for n, _ in modules]
    adaptable = [n for n, m in modules if wrapper_for(m) is not None]
    if isinstance(spec, str):
        matched = [n for n in all_names if re.fullmatch(spec, n)]
        if not matched and require_each:
            raise _no_match_error(f"{kind} regex", spec, adaptable, all_names)
        return matched
    matched: list[str] = []
    for entry in spec:
        hits = [n for n, m in modules if _entry_matches(entry, n, m)]
        if not hits and require_each:
            raise _no_match_error(kind, entry, adaptable, all_names)
        matched += [n for n in hits if n not in matched]
    return matched


def select_lora_targets(model: nn.Module, config) -> list[str]:
    """Module names to wrap for ``config``; raises on patterns that match nothing or name a
    module recpeft cannot wrap (naming the adaptable modules under it). A regex selects only
    among adaptable modules."""
    targets = match_modules(model, config.target_modules, "target_modules")
    excluded = set(match_modules(model, config.exclude_modules, "exclude_modules", require_each=False))
    modules = dict(iter_modules(model))
    adaptable = [n for n, m in modules.items() if wrapper_for(m) is not None]
    if isinstance(config.target_modules, str):  # a regex selects among the adaptable modules
        matched = targets
        targets = [n for n in matched if n in adaptable]
        if not targets:
            raise ValueError(f"target_modules regex {config.target_modules!r} matched only modules recpeft cannot "
                             f"adapt ({_listing(matched)}); adaptable modules: {_listing(adaptable)}")
    chosen = []
    for name in targets:
        if name in excluded:
            continue
        wrapper = wrapper_for(modules[name])
        if wrapper is None:
            inside = [n for n in adaptable if n.startswith(name + ".")]
            where = f"adaptable modules inside it: {_listing(inside)}" if inside else f"adaptable modules: {_listing(adaptable)}"
            raise ValueError(
                f"target {name!r} is a {type(modules[name]).__name__}, which recpeft cannot adapt "
                f"(it wraps {', '.join(sorted({t.__name__ for t in LORA_WRAPPERS}))}); {where}"
            )
        wrapper.check_supported(modules[name], name)
        chosen.append(name)
    if not chosen:
        raise ValueError(f"target_modules selected nothing once exclude_modules was applied; adaptable modules: {_listing(adaptable)}")
    return chosen


def select_modules_to_save(model: nn.Module, config, lora_targets: list[str]) -> list[str]:
    """Module names for ``config.modules_to_save``; a module is either adapted or saved whole."""
    names = match_modules(model, config.modules_to_save, "modules_to_save")
    for name in lora_targets:
        if isinstance(model.get_submodule(name), ModulesToSaveWrapper):
            raise ValueError(f"target {name!r} is saved whole (modules_to_save) by another adapter; it cannot also be adapted")
    for name in names:
        if isinstance(model.get_submodule(name), LoraLayer):
            raise ValueError(f"modules_to_save {name!r} is adapted by LoRA in another adapter; it cannot also be saved whole")
        overlap = [t for t in lora_targets if t == name or t.startswith(name + ".")]
        if overlap:
            raise ValueError(f"modules_to_save {name!r} contains LoRA targets {overlap}; a module is either adapted or saved whole")
    return names
