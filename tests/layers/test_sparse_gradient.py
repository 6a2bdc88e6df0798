"""The embedding adapter's backward touches only the rows the batch used: no tensor the size of
A (V×r) is allocated during backward, and the optimizer leaves untouched rows exactly zero."""

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from recpeft import LoraAdamW, LoraConfig, get_peft_model


def _bytes(t: torch.Tensor) -> int:
    if t.is_sparse:
        return _bytes(t._indices()) + _bytes(t._values())
    return t.untyped_storage().nbytes()


class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any aten op returns while active."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and _bytes(t) > self.largest:
                self.largest, self.op = _bytes(t), func
        return out


class Tables(nn.Module):
    def __init__(self, rows):
        super().__init__()
        self.bag = nn.EmbeddingBag(rows, 4, mode="sum")
        self.emb = nn.Embedding(rows, 4)

    def forward(self, ids, offsets):
        return self.bag(ids, offsets) + self.emb(ids[offsets])


def test_backward_allocates_nothing_the_size_of_a_large_table():
    rows, rank = 2_000_000, 8
    model = get_peft_model(Tables(rows), LoraConfig(r=rank, target_modules=["bag", "emb"]))
    ids = torch.randint(0, rows, (512,))
    offsets = torch.arange(0, 512, 8)
    loss = model(ids, offsets).pow(2).sum()
    with LargestAllocation() as mode:
        loss.backward()
    dense_gradient = rows * rank * 4
    assert mode.largest > 0
    assert mode.largest < dense_gradient / 100, f"{mode.op} allocated {mode.largest} bytes"
    for layer in model.lora_layers().values():
        grad = layer.lora_A["default"].grad
        assert grad.is_sparse and grad._nnz() <= ids.numel()


def test_optimizer_updates_only_the_rows_in_the_batch():
    model = get_peft_model(Tables(1000), LoraConfig(r=4, target_modules=["bag", "emb"]))
    optimizer = LoraAdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(0, 1000, (64,))
    offsets = torch.arange(0, 64, 4)
    for _ in range(3):
        optimizer.zero_grad()
        model(ids, offsets).pow(2).sum().backward()
        optimizer.step()
    for name, layer in model.lora_layers().items():
        touched = set(layer.touched_rows("default").tolist())
        used = set(ids.tolist()) if name == "bag" else set(ids[offsets].tolist())
        assert touched == used, name
