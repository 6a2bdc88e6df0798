"""SASRec: self-attentive sequential recommendation (Kang & McAuley, ICDM 2018).

Item ids 1..N−1, padding id 0 (sequences are left-padded). For a sequence s [B, L]:

    x⁰ = √D·E[s] + P[0..L−1], zeroed at padding positions                       [B, L, D]
    per block:  x = x + Drop(Attn(LN(x)))   causal: position t sees positions ≤ t that are items
                x = x + Drop(FFN(LN(x)))    FFN(h) = W₂·Drop(ReLU(W₁·h)),  zeroed at padding
    h = LN(x)                                                                   [B, L, D]
    score(t, i) = h_t · E[i]     (output table tied to the input table)

Attention is written with explicit ``nn.Linear`` projections ``q``, ``k``, ``v``, ``out`` (torch's
MultiheadAttention hides its in_proj from LoRA). The pre-norm residual order follows the
authors' released code. ``loss`` is the full-softmax cross-entropy over all N items at every
non-padding position — exact, and cheap at the item counts this package tests with (its cost is
B·L·N·D); the paper's one-sampled-negative BCE is not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

PAD = 0


class CausalSelfAttention(nn.Module):
    """Multi-head attention over [B, L, D] with a boolean mask [B, L, L] (True = may attend):
    softmax(q·kᵀ/√d_h, masked)·v per head, then ``out``."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={heads}")
        self.heads, self.dropout = heads, dropout
        self.q, self.k, self.v, self.out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape

        def split(t):  # [B, L, D] → [B, heads, L, D / heads]
            return t.view(B, L, self.heads, D // self.heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            split(self.q(x)),
            split(self.k(x)),
            split(self.v(x)),
            attn_mask=allowed.unsqueeze(1),
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(attended.transpose(1, 2).reshape(B, L, D))


class SASRecBlock(nn.Module):
    """Pre-norm causal self-attention and point-wise feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.attn_norm, self.ffn_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ffn_in, self.ffn_out = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.attn_norm(x), allowed))
        x = x + self.drop(self.ffn_out(self.drop(F.relu(self.ffn_in(self.ffn_norm(x))))))
        return x * keep


class SASRec(nn.Module):
    """Args:
        num_items: size of the item id space **including** the padding id 0 (items 1..N−1).
        max_len: longest sequence L (the position table's size).
        dim: D. num_blocks, num_heads: transformer depth and heads. dropout: on embeddings,
            attention weights, FFN and residual branches.

    Shapes: seq [B, L] int64 (0 = padding, left-padded); ``forward`` → hidden [B, L, D];
    ``score_all`` → [B, N] (column 0, padding, holds the lowest finite value);
    ``loss(seq, targets [B, L])`` → scalar (targets 0 are ignored). ``spec`` rebuilds it.

    With LoRA on ``item_emb`` every item is scored through the adapted table (a lookup of all N
    ids), so the full-softmax loss touches every row of the adapter: the default targets leave
    the table out and adapt the attention and FFN linears.

    Example::

        model = SASRec(num_items=1001, max_len=50, dim=64)
        seq = torch.randint(1, 1001, (8, 50))
        scores = model.score_all(seq)                  # [8, 1001] next-item scores
        loss = model.loss(seq[:, :-1], seq[:, 1:])     # predict each next item
    """

    def __init__(
        self,
        num_items: int,
        max_len: int,
        *,
        dim: int = 64,
        num_blocks: int = 2,
        num_heads: int = 1,
        dropout: float = 0.2,
        init_std: float = 0.02,
    ):
        super().__init__()
        if num_items < 2 or max_len < 1:
            raise ValueError(
                f"num_items must be ≥ 2 (padding id 0 and at least one item), max_len ≥ 1; got {num_items}, {max_len}"
            )
        self.spec = {
            "num_items": num_items,
            "max_len": max_len,
            "dim": dim,
            "num_blocks": num_blocks,
            "num_heads": num_heads,
            "dropout": dropout,
            "init_std": init_std,
        }
        self.item_emb = nn.Embedding(num_items, dim, padding_idx=PAD)
        self.pos_emb = nn.Embedding(max_len, dim)
        for table in (self.item_emb, self.pos_emb):
            nn.init.normal_(table.weight, std=init_std)
        with torch.no_grad():
            self.item_emb.weight[PAD].zero_()
        self.emb_drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(SASRecBlock(dim, num_heads, dropout) for _ in range(num_blocks))
        self.final_norm = nn.LayerNorm(dim)

    def _check(self, seq: torch.Tensor) -> None:
        if seq.dim() != 2 or seq.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"seq must be an integer tensor [B, L], got {seq.dtype} of shape {tuple(seq.shape)}")
        if seq.shape[1] > self.spec["max_len"]:
            raise ValueError(f"seq has length {seq.shape[1]} > max_len={self.spec['max_len']}")
        if seq.numel() and (int(seq.min()) < 0 or int(seq.max()) >= self.spec["num_items"]):
            raise ValueError(
                f"seq ids must lie in [0, {self.spec['num_items']}), got [{int(seq.min())}, {int(seq.max())}]"
            )

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        self._check(seq)
        B, L = seq.shape
        item = seq != PAD  # [B, L]
        keep = item.unsqueeze(-1).to(self.pos_emb.weight.dtype)  # [B, L, 1]
        positions = torch.arange(L, device=seq.device).expand(B, L)  # samples first, for routing
        x = self.emb_drop(self.item_emb(seq) * math.sqrt(self.spec["dim"]) + self.pos_emb(positions)) * keep
        causal = torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()
        # a position attends to earlier items and always to itself (so padding rows stay finite)
        allowed = causal & (item.unsqueeze(1) | torch.eye(L, dtype=torch.bool, device=seq.device))
        for block in self.blocks:
            x = block(x, allowed, keep)
        return self.final_norm(x)

    def item_table(self) -> torch.Tensor:
        """E for every id, through any adapter on ``item_emb``: [N, D]."""
        return self.item_emb(torch.arange(self.spec["num_items"], device=self.pos_emb.weight.device))

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = hidden @ self.item_table().t()
        logits[..., PAD] = torch.finfo(logits.dtype).min
        return logits

    def score_all(self, seq: torch.Tensor) -> torch.Tensor:
        """Next-item scores from the last position: h_{L−1}·Eᵀ, [B, N]; column 0 is the lowest
        finite value (padding is never recommended)."""
        return self._logits(self(seq)[:, -1])

    def loss(self, seq: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean over positions with targets ≠ 0 of −log softmax_i(h_t·E_i)[targets_t]; [B, L] → scalar."""
        if targets.shape != seq.shape:
            raise ValueError(f"targets must have seq's shape {tuple(seq.shape)}, got {tuple(targets.shape)}")
        logits = self._logits(self(seq))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1).long(), ignore_index=PAD)

    def lora_targets(self) -> list[str]:
        """The attention projections and FFN linears of every block, by full module name."""
        return [
            f"blocks.{i}.{name}"
            for i in range(self.spec["num_blocks"])
            for name in ("attn.q", "attn.k", "attn.v", "attn.out", "ffn_in", "ffn_out")
        ]
