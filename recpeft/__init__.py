"""recpeft: parameter-efficient fine-tuning (LoRA) for recommendation models.

    from recpeft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["item_emb", "mlp.0"]))
"""

from .config import LoraBias, LoraConfig
from .layers import LoraEmbedding, LoraEmbeddingBag, LoraLayer, LoraLinear
from .optim import LoraAdamW
from .peft_model import PeftModel, get_peft_model

__version__ = "0.1.0"

__all__ = [
    "LoraAdamW",
    "LoraBias",
    "LoraConfig",
    "LoraEmbedding",
    "LoraEmbeddingBag",
    "LoraLayer",
    "LoraLinear",
    "PeftModel",
    "get_peft_model",
]
