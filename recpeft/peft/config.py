"""LoraConfig: what to adapt and how, and its JSON form (HF PEFT's ``adapter_config.json`` keys).

Per module with full name ``n``: rank r(n) and alpha α(n) come from ``rank_pattern`` /
``alpha_pattern`` (first regex that matches the end of ``n``) or the defaults ``r`` and
``lora_alpha``; the scale is s = α/r, or α/√r with ``use_rslora``.

A saved adapter also records ``adapted_modules`` — every module it wraps with its resolved r and α —
and a config that has it is matched by those names literally: a file's regexes are never run
against a model on load. User regexes run under a time budget (``recpeft.utils.validation
.guarded_pattern``), so one that backtracks exponentially is an error, not a hang. Every field is
checked for its JSON type: ``"false"`` is not a boolean, ``"8"`` not a number.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from torch import nn

from recpeft.utils.atomic import atomic_write_text
from recpeft.utils.validation import (
    check_bool,
    check_fraction,
    check_int,
    compile_pattern,
    guarded_pattern,
    read_json_object,
)

TargetSpec = str | list | tuple | None

CONFIG_NAME = "adapter_config.json"
#: ``peft_type`` of a file HF PEFT can load ("LORA": Linear adapters, modules saved whole) and of
#: one holding recpeft's own layers (embedding tables, torchrec collections), which HF PEFT has no
#: layer for and refuses by this value rather than running the model un-adapted
HF_LORA, RECPEFT_LORA = "LORA", "RECPEFT_LORA"
PEFT_TYPES = (HF_LORA, RECPEFT_LORA)


class LoraBias(str, Enum):
    """Which biases train beside the adapter: none, every bias, or the biases of adapted layers."""

    NONE = "none"
    ALL = "all"
    LORA_ONLY = "lora_only"


_INIT_CHOICES = (True, False, "gaussian")
# HF PEFT keys recpeft reads but whose only supported value is the default given here.
_HF_DEFAULTS = {
    "fan_in_fan_out": False,
    "megatron_config": None,
    "loftq_config": {},
    "layer_replication": None,
    "target_parameters": None,
}
# HF PEFT keys with no effect on the adapter math.
_HF_IGNORED = {
    "revision",
    "auto_mapping",
    "megatron_core",
    "lora_bias",
    "runtime_config",
    "eva_config",
    "corda_config",
    "use_qalora",
    "qalora_group_size",
    "trainable_token_indices",
    "peft_version",
}


# HF PEFT's rule for rank_pattern / alpha_pattern keys: the pattern matches the end of the name.
_SUFFIX_TEMPLATE = r"(?:.*\.)?(?:{})"


def _check_alpha(name: str, value) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ValueError(f"{name} must be positive and finite (a number), got {value!r}")
    return value


def _check_optional_str(name: str, value) -> None:
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{name} must be a string or null, got {value!r}")


def _check_pattern_dict(name: str, patterns, check_value) -> dict:
    if patterns is None:
        return {}
    if not isinstance(patterns, dict):
        raise ValueError(f"{name} must be an object {{regex: value}}, got {patterns!r}")
    for pattern, value in patterns.items():
        compile_pattern(f"{name} key", pattern)
        check_value(f"{name}[{pattern!r}]", value)
    return patterns


def _check_layer_indices(value) -> list[int] | None:
    """``layers_to_transform`` as a list of layer indices ≥ 0 (one int is a list of one)."""
    if value is None:
        return None
    indices = [value] if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(indices, list) or not indices:
        raise ValueError(f"layers_to_transform must be a layer index or a non-empty list of them, got {value!r}")
    for index in indices:
        check_int("layers_to_transform entry", index, minimum=0)
    return list(indices)


def _check_layer_names(value) -> list[str] | None:
    """``layers_pattern`` as a list of module names (one string is a list of one)."""
    if value is None:
        return None
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"layers_pattern must be a module name or a non-empty list of them, got {value!r}")
    return list(names)


def _check_adapted_modules(modules) -> None:
    if modules is None:
        return
    if not isinstance(modules, dict) or not modules:
        raise ValueError(
            f"adapted_modules must be a non-empty object {{module name: {{r, lora_alpha}}}}, got {modules!r}"
        )
    for name, entry in modules.items():
        if not isinstance(name, str) or not name or "\0" in name:
            raise ValueError(f"adapted_modules keys must be module names, got {name!r}")
        if not isinstance(entry, dict) or set(entry) != {"r", "lora_alpha"}:
            raise ValueError(f'adapted_modules[{name!r}] must be {{"r": int, "lora_alpha": number}}, got {entry!r}')
        check_int(f"adapted_modules[{name!r}].r", entry["r"])
        _check_alpha(f"adapted_modules[{name!r}].lora_alpha", entry["lora_alpha"])


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    Args:
        r: rank of every adapter unless ``rank_pattern`` says otherwise.
        lora_alpha: α, the scale numerator (s = α/r).
        lora_dropout: dropout p on the adapter's input (linear layers; embeddings have none).
        target_modules: modules to adapt: a list of exact names or dotted suffixes
            (``"fc1"`` matches ``"tower.fc1"``), a regex string matched against the full name,
            module classes (``[nn.Linear]``), or ``"all-linear"`` (every ``nn.Linear`` but the
            output head ``get_output_embeddings()``, HF PEFT's meaning). Required.
        exclude_modules: same forms; matching modules are never adapted.
        rank_pattern: {regex: r} per module, matched against the end of the full name.
        alpha_pattern: {regex: α} likewise.
        use_rslora: s = α/√r (rank-stabilised LoRA) instead of α/r.
        use_dora: weight-decomposed LoRA on ``nn.Linear`` targets (:mod:`recpeft.layers.dora`):
            a trained magnitude per output row; other target types are refused.
        init_lora_weights: True — linear: A Kaiming-uniform, B zero; embedding: A zero, B normal
            (so untouched rows of A stay zero and are not saved); "gaussian" — A ~ N(0, 1/r) for
            linear; False — both random (the adapter starts non-zero: for tests).
        bias: "none", "all" or "lora_only" (LoraBias): which biases train too.
        modules_to_save: modules (names or suffixes) trained in full and saved beside the adapter.
        adapted_modules: {full module name: {"r": r, "lora_alpha": α}}, the modules an adapter wraps
            as resolved when it was saved (``save_pretrained`` writes it). When set it wins over
            ``target_modules``, ``exclude_modules``, ``rank_pattern`` and ``alpha_pattern``: the
            names are matched literally and the patterns are never run.
        layers_to_transform: keep only the targets inside these layer indices (HF PEFT's):
            a target whose name holds ``.<layers>.<i>.`` is kept when i is listed; None: all.
        layers_pattern: the name(s) of the layer list for ``layers_to_transform`` (e.g.
            ``"layer"`` in ``encoder.layer.3.attention``); None: any module name before the index.
        new_rows: {full module name of an ``nn.Embedding`` / ``nn.EmbeddingBag`` target, or
            ``"<collection>.<table>"`` of a targeted torchrec collection's table: n} — n rows of
            the adapter's own for ids V … V + n − 1, the segment's ids the base table never saw,
            each starting as the table's new-id row (:mod:`recpeft.layers.new_rows`,
            :mod:`recpeft.layers.torchrec.collection_new_rows`).
        new_id_row: that row, the same index for every table in ``new_rows`` (negative counts
            from the end: −1, the default, is the encoder's reserved unseen id).
        config_file: the file this config was read from (not saved; errors name it).

    Example::

        config = LoraConfig(r=8, lora_alpha=16, target_modules=["user_emb", "mlp.0"])
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: TargetSpec = None
    exclude_modules: TargetSpec = None
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    init_lora_weights: Any = True
    bias: LoraBias = LoraBias.NONE
    modules_to_save: list | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"
    layers_to_transform: int | list | None = None
    layers_pattern: str | list | None = None
    adapted_modules: dict | None = None
    new_rows: dict | None = None
    new_id_row: int = -1
    config_file: str | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        check_int("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        check_fraction("lora_dropout", self.lora_dropout, below_one=True)
        check_bool("use_rslora", self.use_rslora)
        check_bool("use_dora", self.use_dora)
        check_bool("inference_mode", self.inference_mode)
        self.layers_to_transform = _check_layer_indices(self.layers_to_transform)
        self.layers_pattern = _check_layer_names(self.layers_pattern)
        if not (isinstance(self.init_lora_weights, bool) or self.init_lora_weights == "gaussian"):
            raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES}, got {self.init_lora_weights!r}")
        for name in ("task_type", "base_model_name_or_path", "config_file"):
            _check_optional_str(name, getattr(self, name))
        try:
            self.bias = LoraBias(self.bias)
        except ValueError:
            raise ValueError(f"bias must be one of {[b.value for b in LoraBias]}, got {self.bias!r}") from None
        if self.peft_type not in PEFT_TYPES:
            raise ValueError(f"peft_type must be one of {list(PEFT_TYPES)}, got {self.peft_type!r}")
        if self.target_modules is None:
            raise ValueError("target_modules is required: module names, a regex, or module classes")
        for name in ("target_modules", "exclude_modules"):
            spec = getattr(self, name)
            if isinstance(spec, tuple):
                setattr(self, name, spec := list(spec))
            if isinstance(spec, str):
                compile_pattern(name, spec)
            elif isinstance(spec, list):
                for item in spec:
                    if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
                        raise TypeError(f"{name} entries must be names or nn.Module classes, got {item!r}")
            elif spec is not None:
                raise TypeError(f"{name} must be a list, a regex string or None, got {type(spec).__name__}")
        self.rank_pattern = _check_pattern_dict("rank_pattern", self.rank_pattern, check_int)
        self.alpha_pattern = _check_pattern_dict("alpha_pattern", self.alpha_pattern, _check_alpha)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if isinstance(self.modules_to_save, tuple):
            self.modules_to_save = list(self.modules_to_save)
        if self.modules_to_save is not None:
            if not isinstance(self.modules_to_save, list):
                raise ValueError(f"modules_to_save must be a list of names or null, got {self.modules_to_save!r}")
            for item in self.modules_to_save:
                if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
                    raise ValueError(f"modules_to_save entries must be names or nn.Module classes, got {item!r}")
        _check_adapted_modules(self.adapted_modules)
        if self.new_rows is not None:
            if not isinstance(self.new_rows, dict) or not all(isinstance(k, str) for k in self.new_rows):
                raise ValueError(f"new_rows must map module names to row counts, got {self.new_rows!r}")
            for name, count in self.new_rows.items():
                check_int(f"new_rows[{name!r}]", count)
        if isinstance(self.new_id_row, bool) or not isinstance(self.new_id_row, int):
            raise ValueError(f"new_id_row must be a row index (int), got {self.new_id_row!r}")

    # ---- per-module values ------------------------------------------------------------------

    def module_settings(self, names: Iterable[str]) -> dict[str, tuple[int, float]]:
        """Module name → (r, α) for each of ``names``: its ``adapted_modules`` entry, else the first
        ``rank_pattern`` / ``alpha_pattern`` key matching the end of the name, else ``r`` /
        ``lora_alpha``. Each pattern gets one time budget for all the names (ValueError past it)."""
        names = list(names)
        saved = self.adapted_modules or {}
        if all(name in saved for name in names):
            return {name: (saved[name]["r"], saved[name]["lora_alpha"]) for name in names}

        def tests(kind: str, patterns: dict) -> list:
            return [
                (guarded_pattern(kind, p, template=_SUFFIX_TEMPLATE, source=self.config_file), v)
                for p, v in patterns.items()
            ]

        rank_tests, alpha_tests = tests("rank_pattern", self.rank_pattern), tests("alpha_pattern", self.alpha_pattern)
        first = lambda checks, name, default: next((v for match, v in checks if match(name)), default)
        return {
            name: (saved[name]["r"], saved[name]["lora_alpha"])
            if name in saved
            else (first(rank_tests, name, self.r), first(alpha_tests, name, self.lora_alpha))
            for name in names
        }

    def scale(self, r: int, alpha: float) -> float:
        """s = α/r, or α/√r with ``use_rslora``."""
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def rank_for(self, module_name: str) -> int:
        return self.module_settings([module_name])[module_name][0]

    def alpha_for(self, module_name: str) -> float:
        return self.module_settings([module_name])[module_name][1]

    def scale_for(self, module_name: str) -> float:
        return self.scale(*self.module_settings([module_name])[module_name])

    @property
    def targets_classes(self) -> bool:
        return isinstance(self.target_modules, list) and any(isinstance(t, type) for t in self.target_modules)

    # ---- JSON ----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """JSON-ready dict with HF PEFT's key names. Module classes cannot go to JSON: resolve them
        to module names first (``PeftModel.save_pretrained`` does)."""
        if self.targets_classes or (
            isinstance(self.exclude_modules, list) and any(isinstance(t, type) for t in self.exclude_modules)
        ):
            raise ValueError(
                "target_modules/exclude_modules hold module classes; replace them with the "
                "module names they matched before writing JSON"
            )
        data = dataclasses.asdict(self)
        data["bias"] = self.bias.value
        del data["config_file"]
        for name, unset in (("adapted_modules", None), ("new_rows", None), ("new_id_row", -1)):
            if data[name] == unset:  # written only when set: other adapters' files stay as they were
                del data[name]
        data.update(_HF_DEFAULTS)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)} - {"config_file"}
        kwargs = {}
        unknown = []
        for key, value in data.items():
            if key in known:
                kwargs[key] = value
            elif key in _HF_DEFAULTS:
                if value not in (_HF_DEFAULTS[key], None, False, {}, []):
                    raise ValueError(f"{source}: {key}={value!r} is not supported by recpeft")
            elif key not in _HF_IGNORED:
                unknown.append(key)
        if unknown:
            warnings.warn(f"{source}: ignoring unknown keys {sorted(unknown)}", stacklevel=2)
        try:
            return cls(**kwargs, config_file=source)
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{source}: {exc}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        atomic_write_text(path, self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, directory: str | Path) -> LoraConfig:
        path = Path(directory) / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}")
        return cls.from_dict(read_json_object(path), source=str(path))

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> LoraConfig:
        """HF PEFT's name for :meth:`load`: the config saved in ``directory``."""
        return cls.load(directory)
