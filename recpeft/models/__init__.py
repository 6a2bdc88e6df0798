"""Reference recommenders recpeft adapts: a torchrec DLRM / DLRM_DCN click model
(``recpeft.models.dlrm``), a two-tower retriever and SASRec.

``ClickDLRM``, ``build_click_model`` and ``single_id_kjt`` are imported on first use, so that
``import recpeft.models`` does not import torchrec and fbgemm (seconds) for the other models.
Each model names its own LoRA targets (``lora_targets()``), so no caller spells out its module
paths. May import: ``recpeft.peft``, ``recpeft.layers``, ``recpeft.kernels``, ``recpeft.utils``;
not its siblings ``datasets`` and ``metrics``, nor anything above.
"""

from __future__ import annotations

from .sasrec import SASRec
from .two_tower import TwoTower

_DLRM_NAMES = ("ClickDLRM", "build_click_model", "single_id_kjt")


def __getattr__(name: str):
    if name in _DLRM_NAMES:
        from . import dlrm

        return getattr(dlrm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SASRec", "TwoTower", *_DLRM_NAMES]
