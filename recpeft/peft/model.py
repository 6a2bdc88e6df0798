"""get_peft_model / PeftModel: inject adapters into a model, switch, merge, route, save, load.

The wrapped model is ``PeftModel.base_model``; every targeted module is replaced in place by its
LoRA wrapper (``recpeft.layers``), every module saved whole by a ModulesToSaveWrapper, every base
parameter is frozen. Adapters are named; their order of addition (``adapter_names``) is what
per-sample routing ids index.

PeftModel knows those wrappers only as adapter holders (``recpeft.layers.AdapterHolder``): it
iterates over them and calls their protocol, whatever an adapter is inside one. The files (HF
PEFT's layout) are written and read by :mod:`recpeft.peft.serialization`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from recpeft.layers import AdapterHolder, LoraLayer, ModulesToSaveWrapper, wrapper_for
from recpeft.layers.routing import check_adapter_ids, grouped_batch, routed
from recpeft.utils.atomic import recover_folder
from recpeft.utils.validation import check_adapter_name

from . import serialization, weighted_merge
from .config import HF_LORA, RECPEFT_LORA, LoraBias, LoraConfig
from .serialization import read_adapter_file, weights_file
from .targeting import group_lora_targets, modules_outside_wrappers, select_lora_targets, select_modules_to_save


def _enable_dora(layer: LoraLayer, name: str, adapter: str) -> None:
    """DoRA for ``adapter`` on ``layer``, or ValueError naming the module whose type has none."""
    if not hasattr(layer, "enable_dora"):
        kind = type(layer.base_layer).__name__
        raise ValueError(
            f"use_dora: {name} is an {kind}; recpeft has DoRA for nn.Linear, nn.Conv1d, nn.Conv2d "
            "and nn.Embedding targets only"
        )
    layer.enable_dora(adapter)


def _add_new_rows(layer: LoraLayer, name: str, adapter: str, config: LoraConfig) -> set[str]:
    """The ``config.new_rows`` entries of module ``name``: ``name`` itself (an nn.Embedding or
    nn.EmbeddingBag) or ``"<name>.<table>"`` (a torchrec collection's table); the keys applied.
    ValueError naming the module whose type takes none."""
    applied = set()
    for key, count in (config.new_rows or {}).items():
        if key == name and hasattr(layer, "add_new_rows"):
            layer.add_new_rows(adapter, count, config.new_id_row)
            applied.add(key)
        elif key.startswith(f"{name}.") and hasattr(layer, "add_table_new_rows"):
            layer.add_table_new_rows(adapter, key[len(name) + 1 :], count, config.new_id_row)
            applied.add(key)
        elif key == name:
            kind = type(layer.base_layer).__name__
            raise ValueError(
                f"new_rows: {name} is an {kind}; new-id rows go on nn.Embedding and nn.EmbeddingBag "
                "targets and on torchrec collections' tables ('<collection>.<table>')"
            )
    return applied


def get_peft_model(model: nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze ``model`` and wrap the modules ``config`` targets with LoRA adapter ``adapter_name``.

    Example::

        model = get_peft_model(model, LoraConfig(r=8, target_modules=["user_emb", "mlp.0"]))
        model.print_trainable_parameters()
    """
    return PeftModel(model, config, adapter_name)


def _check_not_adapted(model: nn.Module) -> None:
    """Refuse a model that already holds adapters: wrapping it again would re-initialise them."""
    held = [n or "<model>" for n, m in model.named_modules() if isinstance(m, (AdapterHolder, PeftModel))]
    if held:
        raise ValueError(
            f"the model already holds adapters (in {', '.join(held[:3])}{', …' if len(held) > 3 else ''}): "
            "wrapping it again would re-initialise them; add another adapter with "
            "peft_model.add_adapter(name, config), or unwrap it first with peft_model.unload()"
        )


def _lora_wrapper(module: nn.Module, name: str) -> LoraLayer:
    """A new LoRA wrapper around ``module``, of the type the registry gives its type."""
    return wrapper_for(module)(module, name)


def _clean_name(param_name: str) -> str:
    """A base parameter's name as the unwrapped model spells it."""
    return param_name.replace(".base_layer.", ".").replace(".original_module.", ".")


class PeftModel(nn.Module):
    """A frozen model with named LoRA adapters.

    Args:
        model: the model to adapt (modified in place: targeted modules are replaced).
        config: the first adapter's LoraConfig.
        adapter_name: its name.

    ``forward(*args, adapter_ids=None, group_by_adapter=False, **kwargs)`` runs the model; with
    ``adapter_ids`` ([B] ints indexing ``adapter_names``, −1 = base model) every sample uses its
    own adapter. ``group_by_adapter=True`` sorts the batch by adapter once before the model runs
    (every tensor input and output whose first dimension is B is per-sample; see
    :func:`recpeft.layers.routing.grouped_batch`): the layers then work on slices, with nothing
    gathered or scattered per layer. The outputs come back in the caller's order.
    """

    def __init__(self, model: nn.Module, config: LoraConfig, adapter_name: str = "default"):
        super().__init__()
        check_adapter_name(adapter_name)
        _check_not_adapted(model)
        self.base_model = model
        self.peft_config: dict[str, LoraConfig] = {}
        self._targets: dict[str, list[str]] = {}
        self._saved: dict[str, list[str]] = {}  # adapter → the modules it saves whole
        self._bias_names: dict[str, list[str]] = {}
        self._inference_only: set[str] = set()
        self._active: list[str] = []
        self._requires_grad_before = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            self.add_adapter(adapter_name, config)
        except BaseException:
            self._restore_requires_grad()
            raise
        self.set_adapter(adapter_name)

    # ---- attributes --------------------------------------------------------------------------

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def get_base_model(self) -> nn.Module:
        """The wrapped model itself, LoRA layers included (HF PEFT's name)."""
        return self.base_model

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """Adapters in the order they were added: routing id i means ``adapter_names[i]``."""
        return tuple(self.peft_config)

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active)

    @property
    def active_adapter(self) -> str:
        return self._active[0] if self._active else ""

    def adapter_holders(self) -> dict[str, AdapterHolder]:
        """Module name → every module holding adapters (LoRA wrappers and modules saved whole)."""
        return {n: m for n, m in modules_outside_wrappers(self.base_model) if isinstance(m, AdapterHolder)}

    def lora_layers(self) -> dict[str, LoraLayer]:
        """Module name → the LoRA wrappers among :meth:`adapter_holders`."""
        return {n: m for n, m in self.adapter_holders().items() if isinstance(m, LoraLayer)}

    # ---- adding, switching, deleting ---------------------------------------------------------

    def add_adapter(self, adapter_name: str, config: LoraConfig) -> None:
        """Add adapter ``adapter_name`` per ``config`` (not activated: see set_adapter)."""
        if not isinstance(config, LoraConfig):
            raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
        check_adapter_name(adapter_name)
        if adapter_name in self.peft_config:
            raise ValueError(f"adapter {adapter_name!r} already exists; adapters: {list(self.adapter_names)}")
        targets = select_lora_targets(self.base_model, config)
        groups = group_lora_targets(self.base_model, targets)  # module → its targeted parts (tables)
        saved = select_modules_to_save(self.base_model, config, list(groups))
        settings = config.module_settings(targets)  # (r, α) per target, each pattern run once per name
        rank_scale = lambda name: (settings[name][0], config.scale(*settings[name]))
        applied: set[str] = set()  # the new_rows keys given to a layer
        try:
            for name, parts in groups.items():
                layer = self._wrap(name, _lora_wrapper)
                if parts is None:
                    layer.update_layer(adapter_name, *rank_scale(name), config.lora_dropout, config.init_lora_weights)
                    if config.use_dora:
                        _enable_dora(layer, name, adapter_name)
                else:  # ranks and scales per "<module>.<part>"
                    parts_rs = {p: rank_scale(f"{name}.{p}") for p in parts}
                    layer.update_parts(adapter_name, parts_rs, config.init_lora_weights)
                applied |= _add_new_rows(layer, name, adapter_name, config)
            untargeted = sorted(set(config.new_rows or {}) - applied)
            if untargeted:
                raise ValueError(
                    f"new_rows names {untargeted}, not among the adapter's targets {sorted(groups)} or their tables"
                )
            for name in saved:
                self._wrap(name, ModulesToSaveWrapper).update(adapter_name)
        except BaseException:
            self._remove_adapter_modules(adapter_name)
            raise
        self.peft_config[adapter_name] = config
        self._targets[adapter_name] = targets
        self._saved[adapter_name] = saved
        self._bias_names[adapter_name] = self._select_biases(config, targets)
        if config.inference_mode:
            self._inference_only.add(adapter_name)
        if self._bias_names[adapter_name] or len(self.peft_config) == 1:  # the first freezes the base
            self._refresh_trainable()
        else:  # only the new adapter's parameters change: no walk over the other adapters
            for name in [*groups, *saved]:
                for param in self.base_model.get_submodule(name).adapter_parameters(adapter_name):
                    param.requires_grad_(adapter_name not in self._inference_only)

    def _wrap(self, name: str, make: Callable[[nn.Module, str], AdapterHolder]) -> AdapterHolder:
        """The holder at ``name``: the one already there (targeting has checked it is of the right
        kind), else ``make(module, name)`` put in the module's place."""
        module = self.base_model.get_submodule(name)
        if isinstance(module, AdapterHolder):
            return module
        wrapper = make(module, name)
        wrapper.train(module.training)
        self._replace(name, wrapper)
        return wrapper

    def _replace(self, name: str, module: nn.Module) -> None:
        parent_name, _, child = name.rpartition(".")
        setattr(self.base_model.get_submodule(parent_name) if parent_name else self.base_model, child, module)

    def _base_parameters(self) -> dict[str, nn.Parameter]:
        """The model's own parameters by the names the unwrapped model gives them (adapter
        tensors and the trainable copies of modules_to_save left out)."""
        return {
            _clean_name(n): p
            for n, p in self.base_model.named_parameters()
            if ".lora_" not in n and ".modules_to_save." not in n
        }

    def _select_biases(self, config: LoraConfig, targets: list[str]) -> list[str]:
        """Names of the biases ``config.bias`` trains (never those of a module saved whole)."""
        if config.bias is LoraBias.NONE:
            return []
        saved_whole = tuple(f"{name}." for names in self._saved.values() for name in names)
        names = [n for n in self._base_parameters() if n.rsplit(".", 1)[-1] == "bias" and not n.startswith(saved_whole)]
        if config.bias is LoraBias.LORA_ONLY:
            names = [n for n in names if n.rsplit(".", 1)[0] in targets]
        return names

    def _refresh_trainable(self) -> None:
        """Base parameters frozen except the biases an adapter's config trains; adapter
        parameters trainable unless loaded for inference."""
        biases = {n for names in self._bias_names.values() for n in names}
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(_clean_name(name) in biases and ".original_module." not in name)
        for holder in self.adapter_holders().values():
            for adapter in holder.adapter_names():
                for param in holder.adapter_parameters(adapter):
                    param.requires_grad_(adapter not in self._inference_only)

    def set_adapter(self, adapter_name: str | list[str]) -> None:
        """Make ``adapter_name`` (or several, whose deltas add up) the active adapter(s); merged
        adapters that are not among them are unmerged first."""
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for name in names:
            self._check_known(name)
        self._active = names
        for holder in self.adapter_holders().values():
            holder.set_active_adapters(names)

    def _check_known(self, adapter_name: str) -> None:
        if adapter_name not in self.peft_config:
            raise KeyError(f"unknown adapter {adapter_name!r}; adapters: {list(self.adapter_names)}")

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove an adapter everywhere; modules left with no adapter are unwrapped."""
        self._check_known(adapter_name)
        if any(adapter_name in holder.merged_adapters for holder in self.adapter_holders().values()):
            raise ValueError(f"adapter {adapter_name!r} is merged; call unmerge_adapter() first")
        self._remove_adapter_modules(adapter_name)
        del self.peft_config[adapter_name], self._targets[adapter_name], self._saved[adapter_name]
        del self._bias_names[adapter_name]
        self._inference_only.discard(adapter_name)
        self.set_adapter([a for a in self._active if a != adapter_name])
        self._refresh_trainable()

    def _remove_adapter_modules(self, adapter_name: str) -> None:
        """Delete ``adapter_name`` from every holder; a holder left empty gives back its module."""
        for name, holder in self.adapter_holders().items():
            if holder.has_adapter(adapter_name):
                holder.delete_adapter(adapter_name)
            if not holder.adapter_names():
                self._replace(name, holder.unwrap(keep_trained=False))

    # ---- forward ----------------------------------------------------------------------------

    def forward(self, *args, adapter_ids=None, group_by_adapter: bool = False, **kwargs):
        if adapter_ids is None:
            return self.base_model(*args, **kwargs)
        ids = check_adapter_ids(adapter_ids, self.adapter_names)
        if not group_by_adapter:
            with routed(ids, self.adapter_names):
                return self.base_model(*args, **kwargs)
        args, kwargs, ids, restore = grouped_batch(args, kwargs, ids)
        with routed(ids, self.adapter_names):
            return restore(self.base_model(*args, **kwargs))

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside the block (merged adapters are unmerged meanwhile);
        blocks nest."""
        holders = list(self.adapter_holders().values())
        before = [(holder, holder.disabled, list(holder.merged_adapters)) for holder in holders]
        for holder in holders:
            holder.unmerge()
            holder.disabled = True
        try:
            yield
        finally:
            for holder, disabled, merged in before:
                holder.disabled = disabled
                holder.merge(merged)

    # ---- merging ----------------------------------------------------------------------------

    def merge_adapter(self, adapter_names: list[str] | None = None) -> None:
        """Add the adapters' deltas (the active ones by default) into the base weights:
        W' = W + s·B·A, E' = E + s·A·B."""
        names = self._active if adapter_names is None else list(adapter_names)
        for name in names:
            self._check_known(name)
        for holder in self.adapter_holders().values():
            holder.merge(names)

    def unmerge_adapter(self) -> None:
        """Subtract every merged delta again (restores the weights to float tolerance)."""
        for holder in self.adapter_holders().values():
            holder.unmerge()

    def merge_and_unload(self) -> nn.Module:
        """Merge the active adapters and return the plain model with no LoRA modules."""
        self.merge_adapter()
        return self._unwrap(keep_trained=True)

    def unload(self) -> nn.Module:
        """Return the plain model without merging (the original weights, unmerged)."""
        self.unmerge_adapter()
        return self._unwrap(keep_trained=False)

    def _unwrap(self, keep_trained: bool) -> nn.Module:
        for name, holder in self.adapter_holders().items():
            self._replace(name, holder.unwrap(keep_trained))
        self._restore_requires_grad()
        self.peft_config, self._active, self._targets, self._saved, self._bias_names = {}, [], {}, {}, {}
        self._inference_only.clear()
        return self.base_model

    def _restore_requires_grad(self) -> None:
        for name, param in self.base_model.named_parameters():
            param.requires_grad_(self._requires_grad_before.get(_clean_name(name), False))

    def add_weighted_adapter(
        self,
        adapters: list[str],
        weights: list[float],
        adapter_name: str,
        combination_type: str = "svd",
        svd_rank: int | None = None,
        density: float | None = None,
        majority_sign_method: str = "total",
        seed: int = 0,
    ) -> None:
        """Add ``adapter_name``, the combination of ``adapters`` with ``weights`` (HF PEFT's
        ``add_weighted_adapter``: "cat", "linear", "svd", "ties", "dare_linear", "dare_ties",
        "magnitude_prune" and their "_svd" forms; the formulas are in
        :mod:`recpeft.peft.weighted_merge`, ``seed`` seeds DARE). Trainable, not activated."""
        weighted_merge.add_weighted_adapter(
            self, adapters, weights, adapter_name, combination_type, svd_rank, density, majority_sign_method, seed
        )

    # ---- counting -------------------------------------------------------------------------

    def get_nb_trainable_parameters(self) -> dict[str, int]:
        """trainable, all, and touched (trainable less the embedding-adapter rows still zero)."""
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        untouched = sum(
            holder.untouched_parameters(adapter)
            for holder in self.adapter_holders().values()
            for adapter in holder.adapter_names()
            if adapter not in self._inference_only
        )
        return {"trainable": trainable, "all": total, "touched": trainable - untouched}

    def print_trainable_parameters(self) -> None:
        counts = self.get_nb_trainable_parameters()
        share = 100.0 * counts["trainable"] / max(counts["all"], 1)
        touched = 100.0 * counts["touched"] / max(counts["all"], 1)
        print(
            f"trainable params: {counts['trainable']:,} || all params: {counts['all']:,} || "
            f"trainable%: {share:.4f} || touched by training: {counts['touched']:,} ({touched:.4f}%)"
        )

    # ---- saving and loading ---------------------------------------------------------------

    def _bias_params(self, adapter: str) -> dict[str, nn.Parameter]:
        """The biases ``adapter`` trains, by their names in the unwrapped model."""
        if not self._bias_names[adapter]:
            return {}  # without the walk over every parameter
        params = self._base_parameters()
        return {n: params[n] for n in self._bias_names[adapter]}

    def adapter_state_dict(self, adapter: str = "default") -> dict[str, torch.Tensor]:
        """The tensors ``save_pretrained`` writes for ``adapter``
        (:func:`~recpeft.peft.serialization.adapter_state_dict`)."""
        self._check_known(adapter)
        return serialization.adapter_state_dict(self.adapter_holders(), self._bias_params(adapter), adapter)

    def save_pretrained(
        self,
        save_directory: str | Path,
        selected_adapters: list[str] | None = None,
        is_main_process: bool = True,
        extra_files: Mapping[str, str] | None = None,
    ) -> None:
        """Write each adapter's ``adapter_model.safetensors`` and ``adapter_config.json`` (the
        "default" adapter into ``save_directory``, others into sub-folders named after them);
        each adapter's folder is written as one set: a crash leaves its old version or its new one
        (:func:`recpeft.utils.atomic.atomic_files`), never a mix. ``extra_files`` (file name →
        text, e.g. the record of the base it was trained on) join every adapter folder's set.

        A model sharded by DistributedModelParallel: call on every process (gathering the
        adapter's shards is collective) with ``is_main_process`` true on one of them, which writes."""
        for adapter in selected_adapters or self.adapter_names:
            self._check_known(adapter)
            state = self.adapter_state_dict(adapter)
            if is_main_process:
                serialization.save_adapter(
                    serialization.adapter_directory(save_directory, adapter),
                    state,
                    self._config_for_file(adapter),
                    extra_files,
                )

    def _config_for_file(self, adapter: str) -> LoraConfig:
        """The adapter's config with module classes replaced by the module names they matched
        (JSON holds names only), ``adapted_modules``: every wrapped module with its r and α,
        which loading matches literally instead of running the config's patterns, and
        ``peft_type``: "LORA" when every holder keys its tensors as HF PEFT does, else
        "RECPEFT_LORA" (recpeft's own format, which HF PEFT refuses)."""
        config = self.peft_config[adapter]
        resolved = {name: {"r": r, "lora_alpha": alpha} for name, (r, alpha) in self._settings(adapter).items()}
        holders = [h for h in self.adapter_holders().values() if h.has_adapter(adapter)]
        peft_type = HF_LORA if all(h.HF_PEFT_LAYOUT for h in holders) else RECPEFT_LORA
        config = dataclasses.replace(config, adapted_modules=resolved, peft_type=peft_type)
        has_class = lambda spec: isinstance(spec, list) and any(isinstance(t, type) for t in spec)  # noqa: E731
        if has_class(config.target_modules) or has_class(config.exclude_modules):
            config = dataclasses.replace(config, target_modules=list(self._targets[adapter]), exclude_modules=None)
        if has_class(config.modules_to_save):
            saved = [n for n in self.adapter_holders() if n in self._saved[adapter]]  # in model order
            config = dataclasses.replace(config, modules_to_save=saved)
        return config

    def _settings(self, adapter: str) -> dict[str, tuple[int, float]]:
        """Target name → (r, α) of ``adapter``, as the config resolves them."""
        return self.peft_config[adapter].module_settings(self._targets[adapter])

    def load_adapter_state(self, adapter: str, tensors: dict[str, torch.Tensor], source: str) -> None:
        """Check every key and shape of ``tensors`` against ``adapter``, then copy them in;
        nothing is copied when any check fails (:func:`~recpeft.peft.serialization.load_adapter_state`)."""
        serialization.load_adapter_state(self.adapter_holders(), self._bias_params(adapter), adapter, tensors, source)

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, model_id: str | Path, adapter_name: str = "default", is_trainable: bool = False
    ) -> PeftModel:
        """Wrap ``model`` with the adapter saved in ``model_id``. On any mismatch the error names
        the first bad key and ``model`` is left as it was. A save of ``model_id`` that was killed
        half-way is finished first (:func:`recpeft.utils.atomic.recover_folder`)."""
        check_adapter_name(adapter_name)
        recover_folder(model_id)
        config = LoraConfig.load(model_id)
        config = dataclasses.replace(config, inference_mode=not is_trainable)
        tensors = read_adapter_file(model_id)
        serialization.check_ranks_fit_file(config, tensors, model_id)
        peft = cls(model, config, adapter_name)
        try:
            peft.load_adapter_state(adapter_name, tensors, str(weights_file(model_id)))
        except BaseException:
            peft.unload()
            raise
        return peft

    def load_adapter(self, model_id: str | Path, adapter_name: str, is_trainable: bool = False) -> None:
        """Add the adapter saved in ``model_id`` under ``adapter_name`` (not activated). On any
        mismatch nothing of it remains in the model."""
        check_adapter_name(adapter_name)
        recover_folder(model_id)
        config = dataclasses.replace(LoraConfig.load(model_id), inference_mode=not is_trainable)
        tensors = read_adapter_file(model_id)
        serialization.check_ranks_fit_file(config, tensors, model_id)
        self.add_adapter(adapter_name, config)
        try:
            self.load_adapter_state(adapter_name, tensors, str(weights_file(model_id)))
        except BaseException:
            self.delete_adapter(adapter_name)
            raise
