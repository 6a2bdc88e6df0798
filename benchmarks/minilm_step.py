"""One training step of a MiniLM text tower, per fine-tuning method: what ``bench_minilm.py`` (CPU,
the real all-MiniLM-L6-v2 weights) and ``gpu_sections/minilm.py`` (GPU, bf16) time side by side.

The step: tokens [B, L] → BertModel → mean over the attention mask → [B, 384] → loss =
mean‖pooled − target‖² against a fixed random target → backward → AdamW step (lr 1e-4) over
what trains. Variants, all on copies of one encoder with the same weights:

    recpeft   recpeft LoRA (r, α) on every layer's attention ``query`` and ``value``
    hf_peft   HF PEFT LoRA, the same config and the same A, B (its unfused base(x) + B(A(x))·s)
    dense     every parameter of the encoder trains

:func:`check_variants` runs before anything is timed: with dropout off, recpeft and HF PEFT give
the same pooled output and the same gradients of every A and B, and the adapter visibly changes
the output (by more than 3x the two variants' difference).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from recpeft.peft.config import LoraConfig
from recpeft.peft.model import get_peft_model

#: all-MiniLM-L6-v2's shape (its config.json): what the GPU section builds with random weights
#: when the pretrained files are not on the machine (timing needs the shape, not the weights)
MINILM_CONFIG = {
    "vocab_size": 30522,
    "hidden_size": 384,
    "num_hidden_layers": 6,
    "num_attention_heads": 12,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "type_vocab_size": 2,
    "hidden_act": "gelu",
}
TARGETS = ["query", "value"]
RANK, ALPHA, LR = 8, 16, 1e-4
VARIANTS = ("recpeft", "hf_peft", "dense")
LABELS = {
    "recpeft": f"recpeft LoRA r={RANK} on query, value",
    "hf_peft": f"HF PEFT LoRA r={RANK} on query, value (unfused)",
    "dense": "dense fine-tuning of every parameter",
}


def random_minilm() -> nn.Module:
    """A BertModel of all-MiniLM-L6-v2's shape with random weights (transformers' own init)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(**MINILM_CONFIG))


def token_batch(batch: int, length: int, vocab: int, device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids [batch, length] with ragged attention masks (every row keeps ≥ length/2
    tokens), so padding is in play as in real titles."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab, (batch, length), generator=g)
    keep = torch.randint(length // 2, length + 1, (batch,), generator=g)
    mask = (torch.arange(length) < keep[:, None]).to(torch.int64)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def pooled(model: nn.Module, tokens: dict[str, torch.Tensor]) -> torch.Tensor:
    """Masked mean of the last hidden states, [B, H]."""
    hidden = model(**tokens).last_hidden_state
    mask = tokens["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0, init_lora_weights=False)


def build_variant(name: str, encoder: nn.Module, seed: int = 0) -> nn.Module:
    """A trainable copy of ``encoder`` for variant ``name``. LoRA variants get non-zero A and B
    drawn from ``seed`` (the same for both LoRA variants, so their outputs can be compared)."""
    model = copy.deepcopy(encoder)
    if name == "dense":
        return model.requires_grad_(True)
    if name == "recpeft":
        model = get_peft_model(model, _lora_config())
    elif name == "hf_peft":
        import peft

        config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, lora_dropout=0.0)
        model = peft.get_peft_model(model, config)
    else:
        raise ValueError(f"unknown MiniLM variant {name!r}; the variants are {list(VARIANTS)}")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(lora_parameters(model).items()):
            param.copy_(torch.randn(param.shape, generator=g) * 0.05)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every LoRA A and B of ``model``, by a name common to recpeft and HF PEFT
    (``<module path>.lora_A`` / ``.lora_B``)."""
    out = {}
    for name, param in model.named_parameters():
        for factor in ("lora_A", "lora_B"):
            if f".{factor}." in name:
                # recpeft: base_model.<path>; HF PEFT: base_model.model.<path>
                module = name.split(f".{factor}.")[0].removeprefix("base_model.").removeprefix("model.")
                out[f"{module}.{factor}"] = param
    return out


class Step:
    """``step()``: one forward, backward and AdamW update of ``model`` on ``tokens``."""

    def __init__(self, model: nn.Module, tokens: dict[str, torch.Tensor], target: torch.Tensor):
        self.model, self.tokens, self.target = model, tokens, target
        self.trained = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.trained, lr=LR)

    def __call__(self) -> None:
        loss = (pooled(self.model, self.tokens) - self.target).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def trainable_share(self) -> float:
        total = sum(p.numel() for p in self.model.parameters())
        return sum(p.numel() for p in self.trained) / total


def check_variants(encoder: nn.Module, tokens: dict[str, torch.Tensor], tol: float) -> dict[str, float]:
    """recpeft and HF PEFT, built with the same A and B, agree on the pooled output and on every
    A and B gradient to ``tol`` × the largest value (float32 on the CPU: the two run the same
    products in a different order, ~1e-6 relative; bf16 on the GPU: a few bf16 roundings,
    ~1e-2); raises AssertionError otherwise. Returns the measured relative differences."""
    built = {name: build_variant(name, encoder).eval() for name in ("recpeft", "hf_peft")}
    outputs, grads = {}, {}
    for name, model in built.items():
        out = pooled(model, tokens)
        out.float().pow(2).sum().backward()
        outputs[name] = out.detach().double()
        grads[name] = {k: p.grad.double() for k, p in lora_parameters(model).items()}
    if set(grads["recpeft"]) != set(grads["hf_peft"]) or not grads["recpeft"]:
        raise AssertionError(f"different LoRA parameters: {sorted(grads['recpeft'])} vs {sorted(grads['hf_peft'])}")
    with torch.no_grad():
        base = pooled(encoder.eval(), tokens).double()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).abs().max() / b.abs().max()).item()

    diffs = {"pooled": rel(outputs["recpeft"], outputs["hf_peft"])}
    diffs |= {k: rel(grads["recpeft"][k], grads["hf_peft"][k]) for k in grads["hf_peft"]}
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > tol:
        raise AssertionError(f"recpeft and HF PEFT disagree on {worst}: relative difference {diffs[worst]:.2e} > {tol}")
    change = rel(outputs["recpeft"], base)
    if not change > 3 * diffs["pooled"]:  # else the check could not tell an adapter from none
        raise AssertionError(f"the adapters barely change the output (relative {change:.2e})")
    return {"max_relative_difference": diffs[worst], "adapter_output_change": change}
