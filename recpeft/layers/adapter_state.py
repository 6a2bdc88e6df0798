"""Checking an adapter file's tensors against the model, in one place: which module (or table) a
key belongs to, then missing, unexpected and misshapen keys, each an AdapterStateError of one line
naming the file and the key (``recpeft.utils.validation`` words them).

    check_adapter_tensors(tensors, {"lora_A.weight": (4, 24)}, source=path, prefix="mlp.0.")
    # "<path>: missing key mlp.0.lora_A.weight" / "... unexpected key ..." / "... has shape ..."
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from recpeft.utils.validation import check_state_keys, check_state_shapes

from .adapter_holder import AdapterStateError


def check_adapter_tensors(
    tensors: Mapping[str, torch.Tensor], expected: Mapping[str, object], *, source: str, prefix: str = ""
) -> None:
    """Raise AdapterStateError for the first key of ``expected`` (key → tensor or shape) missing from
    ``tensors``, else the first key of ``tensors`` not in ``expected``, else the first key whose
    shape differs; keys are named ``<prefix><key>``."""
    check_state_keys(tensors, expected, where=source, prefix=prefix, error=AdapterStateError)
    check_state_shapes(tensors, expected, where=source, prefix=prefix, error=AdapterStateError)


def split_by_prefix(
    tensors: Mapping[str, torch.Tensor], prefixes: list[str], *, source: str, shown: str = "", hint: str
) -> dict[str, dict[str, torch.Tensor]]:
    """{prefix: {key less the prefix: tensor}} for every prefix (empty where no key has it); each key
    goes to the longest prefix it starts with. A key under none raises AdapterStateError
    ``"<source>: unexpected key <shown><key> (<hint>)"``."""
    grouped: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in prefixes}
    longest_first = sorted(prefixes, key=len, reverse=True)
    for key in sorted(tensors):
        prefix = next((p for p in longest_first if key.startswith(p)), None)
        if prefix is None:
            raise AdapterStateError(f"{source}: unexpected key {shown}{key} ({hint})")
        grouped[prefix][key[len(prefix) :]] = tensors[key]
    return grouped
