"""LoraConfig: what to adapt and how, and its JSON form (HF PEFT's ``adapter_config.json`` keys).

Per module with full name ``n``: rank r(n) and alpha α(n) come from ``rank_pattern`` /
``alpha_pattern`` (first regex that matches the end of ``n``) or the defaults ``r`` and
``lora_alpha``; the scale is s = α/r, or α/√r with ``use_rslora``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from torch import nn

from recpeft.utils.atomic import atomic_write_text
from recpeft.utils.validation import check_fraction, check_int, read_json_object

TargetSpec = str | list | tuple | None

CONFIG_NAME = "adapter_config.json"


class LoraBias(str, Enum):
    """Which biases train beside the adapter: none, every bias, or the biases of adapted layers."""

    NONE = "none"
    ALL = "all"
    LORA_ONLY = "lora_only"


_INIT_CHOICES = (True, False, "gaussian")
# HF PEFT keys recpeft reads but whose only supported value is the default given here.
_HF_DEFAULTS = {
    "fan_in_fan_out": False,
    "use_dora": False,
    "layers_to_transform": None,
    "layers_pattern": None,
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


def _pattern_value(patterns: dict, name: str, default):
    """Value of the first pattern that matches the end of ``name`` (HF PEFT's rule:
    ``(.*\\.)?(pattern)$``), else ``default``."""
    for pattern, value in patterns.items():
        if re.fullmatch(rf"(?:.*\.)?(?:{pattern})", name):
            return value
    return default


def _check_patterns(kind: str, patterns: dict) -> None:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{kind} key {pattern!r} is not a valid regex: {exc}") from None


@dataclass
class LoraConfig:
    """Configuration of one LoRA adapter.

    Args:
        r: rank of every adapter unless ``rank_pattern`` says otherwise.
        lora_alpha: α, the scale numerator (s = α/r).
        lora_dropout: dropout p on the adapter's input (linear layers; embeddings have none).
        target_modules: modules to adapt: a list of exact names or dotted suffixes
            (``"fc1"`` matches ``"tower.fc1"``), a regex string matched against the full name,
            or module classes (``[nn.Linear]``). Required.
        exclude_modules: same forms; matching modules are never adapted.
        rank_pattern: {regex: r} per module, matched against the end of the full name.
        alpha_pattern: {regex: α} likewise.
        use_rslora: s = α/√r (rank-stabilised LoRA) instead of α/r.
        init_lora_weights: True — linear: A Kaiming-uniform, B zero; embedding: A zero, B normal
            (so untouched rows of A stay zero and are not saved); "gaussian" — A ~ N(0, 1/r) for
            linear; False — both random (the adapter starts non-zero: for tests).
        bias: "none", "all" or "lora_only" (LoraBias): which biases train too.
        modules_to_save: modules (names or suffixes) trained in full and saved beside the adapter.

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
    init_lora_weights: Any = True
    bias: LoraBias = LoraBias.NONE
    modules_to_save: list | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    inference_mode: bool = False
    peft_type: str = "LORA"

    def __post_init__(self):
        check_int("r", self.r)
        if not self.lora_alpha > 0:
            raise ValueError(f"lora_alpha must be positive, got {self.lora_alpha!r}")
        check_fraction("lora_dropout", self.lora_dropout, below_one=True)
        if self.init_lora_weights not in _INIT_CHOICES:
            raise ValueError(f"init_lora_weights must be one of {_INIT_CHOICES}, got {self.init_lora_weights!r}")
        try:
            self.bias = LoraBias(self.bias)
        except ValueError:
            raise ValueError(f"bias must be one of {[b.value for b in LoraBias]}, got {self.bias!r}") from None
        if self.peft_type != "LORA":
            raise ValueError(f"peft_type must be 'LORA', got {self.peft_type!r}")
        if self.target_modules is None:
            raise ValueError("target_modules is required: module names, a regex, or module classes")
        for name in ("target_modules", "exclude_modules"):
            spec = getattr(self, name)
            if isinstance(spec, tuple):
                setattr(self, name, spec := list(spec))
            if isinstance(spec, str):
                _check_patterns(name, {spec: None})
            elif isinstance(spec, list):
                for item in spec:
                    if not (isinstance(item, str) or (isinstance(item, type) and issubclass(item, nn.Module))):
                        raise TypeError(f"{name} entries must be names or nn.Module classes, got {item!r}")
            elif spec is not None:
                raise TypeError(f"{name} must be a list, a regex string or None, got {type(spec).__name__}")
        _check_patterns("rank_pattern", self.rank_pattern)
        _check_patterns("alpha_pattern", self.alpha_pattern)
        for pattern, rank in self.rank_pattern.items():
            check_int(f"rank_pattern[{pattern!r}]", rank)
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]

    # ---- per-module values ------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        return _pattern_value(self.rank_pattern, module_name, self.r)

    def alpha_for(self, module_name: str) -> float:
        return _pattern_value(self.alpha_pattern, module_name, self.lora_alpha)

    def scale_for(self, module_name: str) -> float:
        r, alpha = self.rank_for(module_name), self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

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
        data.update(_HF_DEFAULTS)
        return data

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> LoraConfig:
        known = {f.name for f in dataclasses.fields(cls)}
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
        return cls(**kwargs)

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
