"""Where models run: the ``--device`` / ``device=`` rule every command and the Trainer share.

``"auto"`` (or None) is CUDA when a CUDA GPU is present, else the CPU; anything else is a torch
device string (``"cpu"``, ``"cuda"``, ``"cuda:1"``), checked against what this machine has so a
wrong one is one clear error, not a failure deep inside the first forward pass.
"""

from __future__ import annotations

import torch

AUTO = "auto"


def resolve_device(spec: str | torch.device | None = AUTO, flag: str = "device") -> torch.device:
    """The torch.device that ``spec`` names (see the module docstring); ValueError naming
    ``flag`` for a device this machine does not have or a string torch does not read."""
    if spec is None or spec == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ValueError(f"{flag} {spec!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {spec!r}: this machine has no CUDA GPU (torch sees none); use cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{flag} {spec!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    elif device.type != "cpu":
        raise ValueError(f"{flag} {spec!r}: recpeft runs on cpu or cuda")
    return device


def describe_device(device: torch.device) -> str:
    """``"cpu"`` or ``"cuda:0 (NVIDIA H200)"``: what reports print and record."""
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def to_device(value, device: torch.device):
    """``value`` (a tensor or anything with ``.to``, e.g. a KeyedJaggedTensor) on ``device``: a
    CPU tensor bound for CUDA is pinned first and copied without blocking the host."""
    if not hasattr(value, "to"):
        return value
    if device.type == "cuda" and isinstance(value, torch.Tensor) and value.device.type == "cpu":
        return value.pin_memory().to(device, non_blocking=True)
    return value.to(device)
