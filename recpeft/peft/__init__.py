"""The PEFT layer: ``LoraConfig`` (what to adapt and how), targeting (which modules a config
selects), ``PeftModel`` / ``get_peft_model`` (inject, switch, merge, route), serialization (the
adapter files, in HF PEFT's layout) and sharded training with torchrec's DistributedModelParallel
(``recpeft.peft.distributed``, imported on demand: it needs torchrec).

May import: ``recpeft.layers``, ``recpeft.kernels``, ``recpeft.utils``.
"""

from .config import CONFIG_NAME, LoraBias, LoraConfig
from .model import PeftModel, get_peft_model
from .serialization import WEIGHTS_NAME, read_adapter_file

__all__ = ["CONFIG_NAME", "LoraBias", "LoraConfig", "PeftModel", "WEIGHTS_NAME", "get_peft_model", "read_adapter_file"]
