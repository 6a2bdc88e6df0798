"""Which modules an adapter wraps: ``target_modules`` / ``exclude_modules`` / ``modules_to_save``
matched against a model's module names, with errors that name what the user could have meant.

Rules (HF PEFT's): a list entry that is a string matches a module whose full name equals it or
ends with ``"." + entry``; a class matches instances; a plain string is a regex that must match
the whole name. Modules already wrapped by recpeft match as the module they wrap. A regex runs
under a time budget (``guarded_pattern``): one that backtracks exponentially is a one-line error
naming it, not a hang. A config with ``adapted_modules`` (a saved adapter's resolved list) selects
exactly those names, literally: no pattern of it is run.

Modules whose wrapper adapts them part by part (torchrec collections: one part per table) are
followed by their parts, named ``"<module>.<part>"``, which match like module names (and, for
class entries, as the collection they belong to); naming the module itself selects all its parts.
Their insides (the collection's own ``nn.EmbeddingBag`` modules) are not targets.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator

from torch import nn

from recpeft.layers import LORA_WRAPPERS, LoraLayer, ModulesToSaveWrapper, wrapper_for
from recpeft.utils.validation import guarded_pattern

_LIST_LIMIT = 12
#: the ``target_modules`` value that selects every Linear layer but the output head (HF PEFT's)
ALL_LINEAR = "all-linear"


def part_names(module: nn.Module) -> list[str] | None:
    """The parts of ``module`` its wrapper adapts one by one, or None."""
    wrapper = wrapper_for(module)
    return None if wrapper is None else wrapper.part_names(module)


def modules_outside_wrappers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``model.named_modules()`` (the same order, each module once) without descending into
    recpeft's wrappers (LoRA layers, modules saved whole) or modules adapted part by part: a
    walk over the base model's modules whose cost does not grow with the adapters added."""
    seen, stack = set(), [("", model)]
    while stack:
        name, module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        yield name, module
        if name and (isinstance(module, (ModulesToSaveWrapper, LoraLayer)) or part_names(module) is not None):
            continue
        children = [(f"{name}.{child}" if name else child, m) for child, m in module._modules.items() if m is not None]
        stack.extend(reversed(children))


def _walk(model: nn.Module) -> Iterator[tuple[str, nn.Module, str | None]]:
    """(name, module, owner) for every target candidate: owner is the module name for a part,
    None for a module. LoRA layers are seen as their base layer; the insides of recpeft's
    wrappers and of modules adapted part by part are skipped."""
    for name, module in modules_outside_wrappers(model):
        if not name:
            continue
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module.original_module, None
            continue
        if isinstance(module, LoraLayer):
            module = module.base_layer
        yield name, module, None
        parts = part_names(module)
        if parts is not None:
            yield from ((f"{name}.{part}", module, name) for part in parts)


def iter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every named module, seeing a LoRA layer as its base layer and skipping
    the insides of recpeft's wrappers; a module adapted part by part is followed by
    ("<name>.<part>", module) for each part, and its insides are skipped."""
    for name, module, _ in _walk(model):
        yield name, module


def part_owners(model: nn.Module) -> dict[str, str]:
    """ "<module>.<part>" → "<module>" for every part of every module adapted part by part."""
    return {name: owner for name, _, owner in _walk(model) if owner is not None}


def _entry_matches(entry, name: str, module: nn.Module) -> bool:
    if isinstance(entry, type):
        return isinstance(module, entry)
    return name == entry or name.endswith("." + entry)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LIST_LIMIT])
    return shown + (f", … ({len(names)} in all)" if len(names) > _LIST_LIMIT else "")


def _no_match_error(kind: str, entry, adaptable: list[str], all_names: list[str], parts: list[str]) -> ValueError:
    label = entry.__name__ if isinstance(entry, type) else entry
    close = difflib.get_close_matches(str(label), all_names, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    tables = f" Tables (targeted as '<module>.<table>' or by table name): {_listing(parts)}" if parts else ""
    return ValueError(
        f"{kind} entry {label!r} matched no module.{hint} Adaptable modules: {_listing(adaptable)}.{tables}"
    )


def _all_linear(model: nn.Module, modules: list[tuple[str, nn.Module]]) -> list[str]:
    """HF PEFT's ``"all-linear"``: every ``nn.Linear`` but the output layer, which is the module
    ``model.get_output_embeddings()`` returns (a language-model head) when the model has one."""
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    return [n for n, m in modules if isinstance(m, nn.Linear) and m is not head]


def match_modules(
    model: nn.Module, spec, kind: str, *, require_each: bool = True, source: str | None = None
) -> list[str]:
    """Names of the modules ``spec`` selects; each list entry (or the regex) must match something.
    A regex runs under a time budget; its error names ``kind`` and ``source`` (a file).
    ``"all-linear"`` selects every Linear layer but the output head (:func:`_all_linear`)."""
    if spec is None:
        return []
    modules = list(iter_modules(model))
    if spec == ALL_LINEAR:
        matched = _all_linear(model, modules)
        if not matched and require_each:
            raise ValueError(f"{kind} {ALL_LINEAR!r} matched no module: the model has no nn.Linear layer")
        return matched
    all_names = [n for n, _ in modules]
    adaptable = [n for n, m in modules if wrapper_for(m) is not None]
    parts = list(part_owners(model))
    if isinstance(spec, str):
        matches = guarded_pattern(kind, spec, source=source)
        matched = [n for n in all_names if matches(n)]
        if not matched and require_each:
            raise _no_match_error(f"{kind} regex", spec, adaptable, all_names, parts)
        return matched
    matched: list[str] = []
    for entry in spec:
        hits = [n for n, m in modules if _entry_matches(entry, n, m)]
        if not hits and require_each:
            raise _no_match_error(kind, entry, adaptable, all_names, parts)
        matched += [n for n in hits if n not in matched]
    return matched


def select_lora_targets(model: nn.Module, config) -> list[str]:
    """Module names to wrap for ``config``; raises on patterns that match nothing or name a
    module recpeft cannot wrap (naming the adaptable modules under it). A regex selects only
    among adaptable modules. A module adapted part by part stands for all its parts: the result
    names parts ("<module>.<part>"), never such a module."""
    owners = part_owners(model)
    modules = dict(iter_modules(model))
    adaptable = [n for n, m in modules.items() if wrapper_for(m) is not None]
    if config.adapted_modules is not None:  # a saved adapter's own list: literal names, no pattern runs
        return _check_targets(_literal_targets(config, owners, modules, adaptable), (), modules, adaptable)
    source = config.config_file
    targets = _expand_parts(match_modules(model, config.target_modules, "target_modules", source=source), owners)
    excluded = set(
        _expand_parts(
            match_modules(model, config.exclude_modules, "exclude_modules", require_each=False, source=source), owners
        )
    )
    if config.layers_to_transform is not None:
        targets = _in_layers(targets, config.layers_to_transform, config.layers_pattern)
    if isinstance(config.target_modules, str):  # a regex selects among the adaptable modules
        matched = targets
        targets = [n for n in matched if n in adaptable]
        if not targets:
            raise ValueError(
                f"target_modules regex {config.target_modules!r} matched only modules recpeft cannot "
                f"adapt ({_listing(matched)}); adaptable modules: {_listing(adaptable)}"
            )
    return _check_targets(targets, excluded, modules, adaptable)


def _literal_targets(config, owners: dict[str, str], modules: dict[str, nn.Module], adaptable: list[str]) -> list[str]:
    """``config.adapted_modules``' names, each of which must be a module (or table part) of
    ``model``, in the model's order."""
    where = f"{config.config_file}: " if config.config_file else ""
    names = _expand_parts(list(config.adapted_modules), owners)
    for name in names:
        if name not in modules:
            error = _no_match_error("adapted_modules", name, adaptable, list(modules), list(owners))
            raise ValueError(f"{where}{error}")
    wanted = set(names)
    return [n for n in modules if n in wanted]


def _check_targets(targets: list[str], excluded, modules: dict[str, nn.Module], adaptable: list[str]) -> list[str]:
    """``targets`` less ``excluded``; each must be a module recpeft can wrap, and one must remain."""
    chosen = []
    for name in targets:
        if name in excluded:
            continue
        wrapper = wrapper_for(modules[name])
        if wrapper is None:
            inside = [n for n in adaptable if n.startswith(name + ".")]
            where = (
                f"adaptable modules inside it: {_listing(inside)}"
                if inside
                else f"adaptable modules: {_listing(adaptable)}"
            )
            raise ValueError(
                f"target {name!r} is a {type(modules[name]).__name__}, which recpeft cannot adapt "
                f"(it wraps {', '.join(sorted({t.__name__ for t in LORA_WRAPPERS}))}); {where}"
            )
        wrapper.check_supported(modules[name], name)
        chosen.append(name)
    if not chosen:
        raise ValueError(
            "target_modules selected nothing once exclude_modules was applied; "
            f"adaptable modules: {_listing(adaptable)}"
        )
    return chosen


def layer_index(name: str, layer_names: list[str] | None) -> int | None:
    """The index i of the layer holding module ``name``: the last ``<layers>.<i>.`` in it (as HF
    PEFT's greedy match finds), where ``<layers>`` is one of ``layer_names`` (None: any module
    name), or None when there is none."""
    parts = name.split(".")
    for position in range(len(parts) - 2, 0, -1):
        if parts[position].isdigit() and (layer_names is None or parts[position - 1] in layer_names):
            return int(parts[position])
    return None


def _in_layers(targets: list[str], indices: list[int], layer_names: list[str] | None) -> list[str]:
    """The targets inside the layers ``indices`` (HF PEFT's ``layers_to_transform``); raises when
    none is left, naming the layer indices the targets do have."""
    kept = [n for n in targets if layer_index(n, layer_names) in indices]
    if not kept:
        found = sorted({i for i in (layer_index(n, layer_names) for n in targets) if i is not None})
        where = f" under {layer_names}" if layer_names else ""
        raise ValueError(
            f"layers_to_transform {indices} kept none of the {len(targets)} targets; their layer indices{where} "
            f"are {found or 'none (no .<layers>.<i>. in their names)'}"
        )
    return kept


def _expand_parts(names: list[str], owners: dict[str, str]) -> list[str]:
    """``names`` with every module that is adapted part by part replaced by its parts."""
    parts_of: dict[str, list[str]] = {}
    for part, owner in owners.items():
        parts_of.setdefault(owner, []).append(part)
    return list(dict.fromkeys(p for name in names for p in parts_of.get(name, [name])))


def group_lora_targets(model: nn.Module, targets: list[str]) -> dict[str, list[str] | None]:
    """Module name → the parts it adapts (None for a module adapted whole), in target order."""
    owners = part_owners(model)
    groups: dict[str, list[str] | None] = {}
    for name in targets:
        owner = owners.get(name)
        if owner is None:
            groups[name] = None
        else:
            groups.setdefault(owner, []).append(name[len(owner) + 1 :])
    return groups


def select_modules_to_save(model: nn.Module, config, lora_targets: list[str]) -> list[str]:
    """Module names for ``config.modules_to_save``; a module is either adapted or saved whole."""
    names = match_modules(model, config.modules_to_save, "modules_to_save")
    for name in lora_targets:
        if isinstance(model.get_submodule(name), ModulesToSaveWrapper):
            raise ValueError(
                f"target {name!r} is saved whole (modules_to_save) by another adapter; it cannot also be adapted"
            )
    for name in names:
        if isinstance(model.get_submodule(name), LoraLayer):
            raise ValueError(
                f"modules_to_save {name!r} is adapted by LoRA in another adapter; it cannot also be saved whole"
            )
        overlap = [t for t in lora_targets if t == name or t.startswith(name + ".")]
        if overlap:
            raise ValueError(
                f"modules_to_save {name!r} contains LoRA targets {overlap}; a module is either adapted or saved whole"
            )
    return names
