"""Adapter files, in HF PEFT's layout: ``adapter_config.json`` beside
``adapter_model.safetensors``, tensors keyed ``base_model.model.<module>.<tensor>``.

Embedding adapters store only their touched rows (see ``recpeft.layers.table``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."



def read_adapter_file(directory: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of ``directory/adapter_model.safetensors``; raises naming the file on a missing
    or unreadable file and naming the tensor on non-finite values."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ValueError(f"{path}: tensor {key!r} holds non-finite values (NaN or inf)")
    return tensors
