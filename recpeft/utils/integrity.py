"""A sha256 of a safetensors file's tensors, recorded in the file's own header metadata
(``recpeft_sha256``) when it is written and checked when it is read: flipped bytes in the tensor
data, or a header edited to reinterpret them, are refused with an error naming the file. Files
without the record (written by other tools or older versions) are read unchecked.

The digest runs over the tensors in key order: key, dtype, shape, then the raw bytes — so it does
not depend on where in the file the writer placed each tensor.

    write_safetensors(state, "out/adapter_model.safetensors", {"format": "pt"})
    tensors = read_safetensors("out/adapter_model.safetensors")   # ValueError on a mismatch
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

DIGEST_KEY = "recpeft_sha256"


def tensor_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over ``tensors`` in key order: key, dtype, shape and raw bytes of each."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def write_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """``save_file`` with the tensors' digest added to the header metadata; the file gets the
    mode ``open()`` gives (0666 less the umask)."""
    state = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(state, str(path), metadata={**(metadata or {}), DIGEST_KEY: tensor_digest(state)})
    os.chmod(path, 0o666 & ~current_umask())  # safetensors creates 0600; give what open() gives


def current_umask() -> int:
    """The process umask (from /proc where it can be read without changing it)."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def recorded_digest(path: str | Path) -> str | None:
    """The digest recorded in ``path``'s header, or None."""
    with safe_open(str(path), framework="pt") as handle:
        return (handle.metadata() or {}).get(DIGEST_KEY)


def check_digest(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse ``tensors`` (read from ``path``) when they do not hash to the digest ``path`` records."""
    expected = recorded_digest(path)
    if expected is not None and tensor_digest(tensors) != expected:
        raise ValueError(
            f"{path} is corrupt: its tensor data does not match the sha256 recorded when it was saved "
            "(flipped bytes or an edited file); save it again or restore a copy"
        )


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``path``, checked against its recorded digest; one-line ValueError naming
    the file when it is unreadable or corrupt."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
    check_digest(path, tensors)
    return tensors


def header_shapes(path: str | Path) -> dict[str, list[int]]:
    """Tensor name → shape from ``path``'s header, reading no tensor data (ValueError naming the file)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: list(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{path} is not a readable safetensors file ({exc})") from None
