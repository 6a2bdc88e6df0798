"""Adapter files, in HF PEFT's layout: ``adapter_config.json`` beside
``adapter_model.safetensors``, tensors keyed ``base_model.model.<module>.<tensor>``; adapters other
than "default" in a sub-folder named after them.

The file's tensors are the adapter holders' own (``AdapterHolder.export_adapter``: embedding
adapters store only their touched rows, see ``recpeft.layers.table``) plus the biases the
adapter's config trains, keyed by their names in the unwrapped model. Reading checks every key
and shape before anything is written into the model.

    state = adapter_state_dict(holders, biases, "default")     # what save_pretrained writes
    save_adapter(adapter_directory(out, "default"), state, config)
    load_adapter_state(holders, biases, "default", read_adapter_file(out), source=str(weights_file(out)))
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from recpeft.layers import AdapterHolder, LoraLayer
from recpeft.layers.adapter_state import check_adapter_tensors, split_by_prefix
from recpeft.utils.atomic import atomic_files, recover_folder
from recpeft.utils.integrity import read_safetensors, write_safetensors
from recpeft.utils.validation import first_non_finite

from .config import CONFIG_NAME, LoraConfig

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."


def adapter_directory(save_directory: str | Path, adapter: str) -> Path:
    """Where ``adapter``'s files go: ``save_directory`` for "default", else its sub-folder ``adapter``."""
    return Path(save_directory) if adapter == "default" else Path(save_directory) / adapter


def weights_file(directory: str | Path) -> Path:
    """``directory/adapter_model.safetensors``."""
    return Path(directory) / WEIGHTS_NAME


# ---- the model's side --------------------------------------------------------------------------


def _holder_prefixes(holders: Mapping[str, AdapterHolder], adapter: str) -> dict[str, AdapterHolder]:
    """File-key prefix ``base_model.model.<module name>.`` → holder, for the holders of ``adapter``."""
    return {f"{KEY_PREFIX}{name}.": holder for name, holder in holders.items() if holder.has_adapter(adapter)}


def _bias_keys(
    holders: Mapping[str, AdapterHolder], biases: Mapping[str, torch.Tensor], adapter: str
) -> dict[str, torch.Tensor]:
    """File key → trained bias, in HF PEFT's layout: the bias of a module ``adapter`` wraps with
    LoRA stands in its base layer (``base_model.model.<module>.base_layer.bias``), any other under
    its name in the unwrapped model (``base_model.model.<module>.bias``)."""
    keys = {}
    for name, bias in biases.items():
        module, leaf = name.rsplit(".", 1)
        holder = holders.get(module)
        wrapped = isinstance(holder, LoraLayer) and holder.has_adapter(adapter)
        keys[f"{KEY_PREFIX}{module}.base_layer.{leaf}" if wrapped else KEY_PREFIX + name] = bias
    return keys


def adapter_state_dict(
    holders: Mapping[str, AdapterHolder], biases: Mapping[str, torch.Tensor], adapter: str
) -> dict[str, torch.Tensor]:
    """The file tensors of ``adapter``, contiguous and on the CPU: every holder's
    ``export_adapter(adapter)`` under ``base_model.model.<holder name>.``, and every trained bias
    (``biases``: name in the unwrapped model → tensor) under its HF PEFT key (:func:`_bias_keys`).
    Collective where a holder's adapter is sharded."""
    state = {}
    for prefix, holder in _holder_prefixes(holders, adapter).items():
        state.update({prefix + key: value for key, value in holder.export_adapter(adapter).items()})
    state.update({key: bias.detach() for key, bias in _bias_keys(holders, biases, adapter).items()})
    return {k: v.contiguous().cpu() for k, v in state.items()}


def load_adapter_state(
    holders: Mapping[str, AdapterHolder],
    biases: Mapping[str, torch.Tensor],
    adapter: str,
    tensors: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    """Check every key and shape of ``tensors`` (a file's, keyed as :func:`adapter_state_dict`
    keys them) against ``adapter`` of ``holders`` and ``biases``, then copy them in; nothing is
    copied when any check fails (AdapterStateError naming ``source`` and the first bad key)."""
    bias_keys = _bias_keys(holders, biases, adapter)
    parts = _holder_prefixes(holders, adapter)
    grouped = split_by_prefix(
        {k: v for k, v in tensors.items() if k not in bias_keys},
        list(parts),
        source=source,
        hint="no such adapted module in the model",
    )
    check_adapter_tensors({k: v for k, v in tensors.items() if k in bias_keys}, bias_keys, source=source)
    for prefix, holder in parts.items():
        holder.check_adapter_state(adapter, grouped[prefix], source)
    for prefix, holder in parts.items():
        holder.load_adapter_state(adapter, grouped[prefix])
    with torch.no_grad():
        for key, bias in bias_keys.items():
            bias.copy_(tensors[key])


# ---- the files ---------------------------------------------------------------------------------


def save_adapter(
    directory: str | Path,
    state: Mapping[str, torch.Tensor],
    config: LoraConfig,
    extra_files: Mapping[str, str] | None = None,
) -> None:
    """Write ``state`` as ``directory/adapter_model.safetensors`` (with the sha256 of its tensors in
    the header, :mod:`recpeft.utils.integrity`), ``config`` as ``directory/adapter_config.json``
    and each of ``extra_files`` (flat file name → text) as one set
    (:func:`recpeft.utils.atomic.atomic_files`): a crash at any point leaves the old adapter or the
    new one. The config is serialised before anything is written."""
    config_text = config.to_json() + "\n"
    extra = dict(extra_files or {})
    for name in extra:
        if name in (WEIGHTS_NAME, CONFIG_NAME) or Path(name).name != name or name.startswith("."):
            raise ValueError(f"save_adapter: extra file {name!r} must be a plain file name other than the adapter's")
    with atomic_files(directory) as tmp:
        write_safetensors(state, tmp / WEIGHTS_NAME, {"format": "pt", "library": "recpeft"})
        (tmp / CONFIG_NAME).write_text(config_text)
        for name, text in extra.items():
            (tmp / name).write_text(text)


def read_adapter_file(directory: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of ``directory/adapter_model.safetensors`` (an interrupted save of the folder is
    finished first, :func:`recpeft.utils.atomic.recover_folder`); raises naming the file on a
    missing, unreadable or corrupt file (tensor data not matching its recorded sha256) and naming
    the tensor on non-finite values."""
    recover_folder(directory)
    path = weights_file(directory)
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    tensors = read_safetensors(path)
    bad = first_non_finite(tensors)
    if bad is not None:
        raise ValueError(f"{path}: tensor {bad!r} holds non-finite values (NaN or inf)")
    return tensors


def check_ranks_fit_file(config: LoraConfig, tensors: Mapping[str, torch.Tensor], source: str | Path) -> None:
    """Refuse a config whose ranks its weights file cannot hold, before any adapter is allocated.

    Every adapter keeps a dense B with r as one of its dimensions (Linear: B [N, r]; tables and
    table collections: B [r, D]) in the file, so a rank the file uses is at most the largest
    dimension of its tensors. Without this check an edited ``adapter_config.json`` with r = 10^9
    would allocate r·K parameters per module before the shape check could refuse it. Checked: the
    ``adapted_modules`` entries when the file has them, else ``r`` and every ``rank_pattern`` value."""
    largest = max((max(t.shape, default=1) for t in tensors.values()), default=0)
    if config.adapted_modules:
        ranks = {f"adapted_modules[{name!r}].r": entry["r"] for name, entry in config.adapted_modules.items()}
    else:
        ranks = {"r": config.r, **{f"rank_pattern[{key!r}]": r for key, r in config.rank_pattern.items()}}
    for field_name, r in ranks.items():
        if r > largest:
            raise ValueError(
                f"{Path(source) / CONFIG_NAME}: {field_name} = {r} is larger than every dimension of the "
                f"tensors in {WEIGHTS_NAME} (largest {largest}): the config does not match its weights"
            )
