"""A two-tower retriever whose item tower reads product titles with a pretrained text encoder
(a Hugging Face transformer such as all-MiniLM-L6-v2), for product search and recommendation:

    u = U[user]                                          [B, D]   a trained user table
    h = encoder(title tokens).last_hidden_state          [N, L, H]
    v = P · (Σ_t mask_t·h_t / Σ_t mask_t)                [N, D]   mean over the title's tokens, projected
    score(user, item) = u · v

Trained with the in-batch softmax (:func:`in_batch_softmax_loss`); retrieval scores every user
against the whole catalogue (``item_embeddings`` of every title). The encoder is the part LoRA
adapts (``lora_targets``: its attention query and value projections); the user table and the
projection are trained whole (``modules_to_save`` under LoRA).
"""

from __future__ import annotations

import torch
from torch import nn

from .two_tower import TwoTower

in_batch_softmax_loss = TwoTower.in_batch_softmax_loss


class TextItemTower(nn.Module):
    """v = P · masked mean of ``encoder``'s last hidden states, [N, D]."""

    def __init__(self, encoder: nn.Module, dim: int):
        super().__init__()
        self.encoder = encoder
        self.project = nn.Linear(encoder.config.hidden_size, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.project((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


class TextTwoTower(nn.Module):
    """Args: num_users; encoder: a Hugging Face encoder with ``config.hidden_size``; dim: D."""

    def __init__(self, num_users: int, encoder: nn.Module, dim: int = 64, init_std: float = 0.1):
        super().__init__()
        self.users = nn.Embedding(num_users, dim)
        nn.init.normal_(self.users.weight, std=init_std)
        self.items = TextItemTower(encoder, dim)

    def user_embeddings(self, user: torch.Tensor) -> torch.Tensor:
        return self.users(user)

    def item_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.items(input_ids, attention_mask)

    def lora_targets(self) -> list[str]:
        """The encoder's attention query and value projections (the usual LoRA targets of BERT),
        as dotted suffixes."""
        return ["query", "value"]

    def trained_whole(self) -> list[str]:
        """What every method trains in full: the user table and the projection."""
        return ["users", "items.project"]
