"""Small torchrec models and batches shared by the torchrec tests (unsharded and sharded)."""

from __future__ import annotations

import logging

import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRM_Projection
from torchrec.modules.embedding_configs import PoolingType

logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)

DIM, DENSE_IN = 8, 4
#: (table, rows, features, pooling); t_cat is looked up by two features
TABLES = [
    ("t_user", 400, ["user"], PoolingType.SUM),
    ("t_item", 500, ["item", "item_hist"], PoolingType.SUM),
    ("t_cat", 300, ["cat"], PoolingType.MEAN),
    ("t_shop", 200, ["shop"], PoolingType.SUM),
]
FEATURES = [f for _, _, features, _ in TABLES for f in features]
ROWS = {f: rows for _, rows, features, _ in TABLES for f in features}


def table_configs(pooling: bool = True) -> list[EmbeddingBagConfig]:
    return [
        EmbeddingBagConfig(
            name=name,
            embedding_dim=DIM,
            num_embeddings=rows,
            feature_names=list(features),
            pooling=pool if pooling else PoolingType.SUM,
        )
        for name, rows, features, pool in TABLES
    ]


def make_dlrm(kind: str = "dcn", seed: int = 0, pooling: bool = True) -> torch.nn.Module:
    """A torchrec DLRM ("dlrm"), DLRM_DCN ("dcn") or DLRM_Projection ("projection"), built with
    torchrec's own constructors."""
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(table_configs(pooling))
    common = dict(
        embedding_bag_collection=ebc,
        dense_in_features=DENSE_IN,
        dense_arch_layer_sizes=[16, DIM],
        over_arch_layer_sizes=[16, 1],
    )
    if kind == "dlrm":
        return DLRM(**common)
    if kind == "dcn":
        return DLRM_DCN(**common, dcn_num_layers=2, dcn_low_rank_dim=4)
    if kind == "projection":
        return DLRM_Projection(
            **common, interaction_branch1_layer_sizes=[16, DIM * 3], interaction_branch2_layer_sizes=[16, DIM * 2]
        )
    raise ValueError(kind)


def make_kjt(batch: int, generator: torch.Generator, max_len: int = 3, weighted: bool = False) -> KeyedJaggedTensor:
    """Every feature of TABLES, 0..max_len ids per bag (empty bags included)."""
    lengths = torch.randint(0, max_len + 1, (len(FEATURES), batch), generator=generator)
    values = torch.cat(
        [torch.randint(0, ROWS[f], (int(n),), generator=generator) for f, n in zip(FEATURES, lengths.sum(1))]
    )
    weights = torch.rand(values.numel(), generator=generator) if weighted else None
    return KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=values, lengths=lengths.reshape(-1), weights=weights
    )


def make_batch(batch: int = 16, seed: int = 1):
    """(dense [B, 4], sparse KJT, labels [B])."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.randn(batch, DENSE_IN, generator=g)
    sparse = make_kjt(batch, g)
    labels = (torch.rand(batch, generator=g) < 0.4).float()
    return dense, sparse, labels


def slice_batch(batch, start: int, stop: int):
    """Samples [start, stop) of a batch from :func:`make_batch` (the KJT sliced per feature)."""
    dense, sparse, labels = batch
    per_key = sparse.to_dict()
    values, lengths = [], []
    for key in sparse.keys():
        jt = per_key[key]
        offsets = jt.offsets()
        values.append(jt.values()[offsets[start] : offsets[stop]])
        lengths.append(jt.lengths()[start:stop])
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=torch.cat(values), lengths=torch.cat(lengths))
    return dense[start:stop], kjt, labels[start:stop]
