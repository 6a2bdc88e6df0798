"""A click model built from torchrec's DLRM / DLRM_DCN, over single-id categorical features.

One ``EmbeddingBagCollection`` holds a table ``t_<feature>`` [V_f, D] per sparse feature (SUM
pooling; each bag holds one id, so the pooled vector is the row). torchrec's arches then compute

    x_d = DenseArch(dense)                                   [B, D]
    z   = InteractionArch(x_d, e_1 … e_F)                    DLRM: [x_d, pairwise dots]   [B, D + F(F+1)/2]
                                                             DCN:  low-rank cross net     [B, (F+1)·D]
    logit = OverArch(dropout(z))                             [B]

``ClickDLRM`` adopts the four arches of the torchrec model that ``build_click_model`` builds, so
module and state-dict names are torchrec's (``sparse_arch.embedding_bag_collection``,
``over_arch.model.1``) and LoRA targets, DMP sharding plans and checkpoints carry over.
Dropout: torchrec's ``OverArch`` has none, so ``dropout`` applies to the over arch's input z
(the interaction features), in training mode only.
"""

from __future__ import annotations

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import PoolingType

from recpeft.utils.validation import check_fraction, check_int

KINDS = ("dlrm", "dcn")


def table_name(feature: str) -> str:
    """The embedding table of sparse feature ``feature``."""
    return f"t_{feature}"


def single_id_kjt(ids: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """A KeyedJaggedTensor with one id per bag: ``ids`` maps feature → int64 ids [B] (same B)."""
    if not ids:
        raise ValueError("ids must name at least one feature")
    sizes = {name: t.shape for name, t in ids.items()}
    batch = next(iter(sizes.values()))
    if any(s != batch or len(s) != 1 for s in sizes.values()):
        raise ValueError(f"every feature needs ids of shape [B]; got {sizes}")
    values = torch.cat([t.long() for t in ids.values()])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(ids), values=values, lengths=torch.ones(values.numel(), dtype=torch.int32)
    )


class ClickDLRM(nn.Module):
    """Click logits from dense features and single-id sparse features; build it with
    :func:`build_click_model`.

    Input: dense [B, num_dense] float, sparse KeyedJaggedTensor with every feature of ``spec``
    (one id per bag; :func:`single_id_kjt` makes one). Output: logits [B].

    ``spec`` is the JSON-able dict of constructor arguments (``build_click_model(**model.spec)``
    rebuilds the architecture); ``lora_targets()`` lists every table and every MLP layer.

    Example::

        model = build_click_model({"user": 1000, "item": 500}, num_dense=3, kind="dcn")
        sparse = single_id_kjt({"user": torch.tensor([1, 2]), "item": torch.tensor([7, 9])})
        logits = model(torch.randn(2, 3), sparse)        # [2]
    """

    def __init__(self, dlrm: DLRM, spec: dict, dropout: float = 0.0):
        super().__init__()
        self.sparse_arch, self.dense_arch = dlrm.sparse_arch, dlrm.dense_arch
        self.inter_arch, self.over_arch = dlrm.inter_arch, dlrm.over_arch
        self.dropout = nn.Dropout(dropout)
        self.spec = spec

    @property
    def features(self) -> list[str]:
        return list(self.spec["cardinalities"])

    def forward(self, dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
        if dense.dim() != 2 or dense.shape[1] != self.spec["num_dense"]:
            raise ValueError(f"dense must be [B, {self.spec['num_dense']}], got {tuple(dense.shape)}")
        missing = sorted(set(self.features) - set(sparse.keys()))
        if missing:
            raise ValueError(f"sparse features {missing} are missing from the KeyedJaggedTensor (keys {sparse.keys()})")
        z = self.inter_arch(dense_features=self.dense_arch(dense), sparse_features=self.sparse_arch(sparse))
        return self.over_arch(self.dropout(z)).squeeze(1)

    def lora_targets(self, frozen_features: tuple[str, ...] | list[str] = ()) -> list[str]:
        """Full module names of the tables of every feature but ``frozen_features``, every
        dense-arch layer and every over-arch layer: :func:`click_model_lora_targets` for this
        model's architecture (the same names before and after get_peft_model wraps them)."""
        return click_model_lora_targets(
            self.features, len(self.spec["dense_arch"]), len(self.spec["over_arch"]), frozen_features
        )


def click_model_lora_targets(
    features, dense_layers: int, over_layers: int, frozen_features: tuple[str, ...] | list[str] = ()
) -> list[str]:
    """LoRA targets of a :func:`build_click_model` model over ``features`` with ``dense_layers``
    dense-arch and ``over_layers`` over-arch hidden layers, before the model is built: the table
    of every feature not in ``frozen_features``, every dense-arch linear and every over-arch
    linear (torchrec's OverArch: an MLP of ``over_layers`` perceptrons, then the 1-unit linear
    ``model.1``). Freezing the user and item tables keeps a segment's adapter small: attribute
    tables are shared by a segment's rows, id tables need many rows per id."""
    frozen = set(frozen_features)
    tables = [f"sparse_arch.embedding_bag_collection.{table_name(f)}" for f in features if f not in frozen]
    dense = [f"dense_arch.model._mlp.{i}._linear" for i in range(dense_layers)]
    over = [f"over_arch.model.0._mlp.{i}._linear" for i in range(over_layers)]
    return tables + dense + over + ["over_arch.model.1"]


def _check_spec(
    cardinalities: dict, num_dense: int, kind: str, embedding_dim: int, dense_arch, over_arch, dropout: float
) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not cardinalities:
        raise ValueError("cardinalities must name at least one sparse feature")
    for feature, rows in cardinalities.items():
        check_int(f"cardinalities[{feature!r}]", rows)
    if num_dense < 1:
        raise ValueError(f"num_dense must be ≥ 1 (torchrec's DenseArch needs an input), got {num_dense}")
    if not dense_arch or dense_arch[-1] != embedding_dim:
        raise ValueError(f"dense_arch {list(dense_arch)} must end with embedding_dim={embedding_dim}")
    if not over_arch:
        raise ValueError("over_arch needs at least one hidden layer size")
    check_fraction("dropout", dropout, below_one=True)


def build_click_model(
    cardinalities: dict[str, int],
    num_dense: int,
    *,
    kind: str = "dlrm",
    embedding_dim: int = 16,
    dense_arch: tuple[int, ...] = (64, 16),
    over_arch: tuple[int, ...] = (64, 32),
    dcn_layers: int = 2,
    dcn_rank: int = 8,
    dropout: float = 0.0,
    init_std: float = 0.05,
) -> ClickDLRM:
    """A :class:`ClickDLRM` of torchrec's ``DLRM`` (kind="dlrm") or ``DLRM_DCN`` (kind="dcn").

    Args:
        cardinalities: sparse feature → number of ids V_f; table ``t_<feature>`` [V_f, D] each.
        num_dense: number of dense input features.
        kind: "dlrm" (pairwise dot interaction) or "dcn" (low-rank cross net, ``dcn_layers``
            layers of rank ``dcn_rank``).
        embedding_dim: D; ``dense_arch`` must end with it.
        dense_arch: DenseArch layer sizes. over_arch: OverArch hidden sizes (a final 1-unit
            linear is appended).
        dropout: on the over arch's input, training only.
        init_std: tables start N(0, init_std²) (torchrec's default, U(±1/√V), shrinks with V).
    """
    dense_arch, over_arch = tuple(dense_arch), tuple(over_arch)
    _check_spec(cardinalities, num_dense, kind, embedding_dim, dense_arch, over_arch, dropout)
    spec = {
        "cardinalities": dict(cardinalities),
        "num_dense": num_dense,
        "kind": kind,
        "embedding_dim": embedding_dim,
        "dense_arch": list(dense_arch),
        "over_arch": list(over_arch),
        "dcn_layers": dcn_layers,
        "dcn_rank": dcn_rank,
        "dropout": dropout,
        "init_std": init_std,
    }
    tables = [
        EmbeddingBagConfig(
            name=table_name(f),
            embedding_dim=embedding_dim,
            num_embeddings=rows,
            feature_names=[f],
            pooling=PoolingType.SUM,
            init_fn=lambda w: nn.init.normal_(w, std=init_std),
        )
        for f, rows in cardinalities.items()
    ]
    common = dict(
        embedding_bag_collection=EmbeddingBagCollection(tables),
        dense_in_features=num_dense,
        dense_arch_layer_sizes=list(dense_arch),
        over_arch_layer_sizes=[*over_arch, 1],
    )
    dlrm = (
        DLRM(**common) if kind == "dlrm" else DLRM_DCN(**common, dcn_num_layers=dcn_layers, dcn_low_rank_dim=dcn_rank)
    )
    return ClickDLRM(dlrm, spec, dropout)
