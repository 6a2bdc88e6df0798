"""recpeft: parameter-efficient fine-tuning (LoRA) for recommendation models.

    from recpeft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=8, target_modules=["item_emb", "mlp.0"]))

The packages, one per layer; each imports only from those after it (checked by import-linter,
see pyproject.toml): ``cli`` → ``apps`` → ``train`` → {``datasets``, ``models``, ``metrics``} →
``peft`` → ``layers`` → ``kernels`` (the top-level ``kernels/`` folder); ``utils`` from anywhere.
The names below are imported on first use, so ``import recpeft`` (and ``recpeft --help``) does
not import torch.
"""

from .utils.lazy import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "AdapterBank": ".apps.adapter_bank",
    "LoraAdamW": ".train.lora_adamw",
    "LoraBias": ".peft.config",
    "LoraConfig": ".peft.config",
    "LoraEmbedding": ".layers",
    "LoraEmbeddingBag": ".layers",
    "LoraLayer": ".layers",
    "LoraLinear": ".layers",
    "PeftModel": ".peft.model",
    "get_peft_model": ".peft.model",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
