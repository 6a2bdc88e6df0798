"""The click model recpeft trains on the embedded shop, and the adapter it personalises it with:
shared by ``recpeft demo`` (which trains them) and ``recpeft bench`` (which measures them at
production table sizes).
"""

from __future__ import annotations

from recpeft.datasets.synthetic import SHOP_SCHEMA
from recpeft.models.dlrm import click_model_lora_targets
from recpeft.peft.config import LoraConfig

#: ``build_click_model`` options of the shop's base: a torchrec DLRM with D = 64
BASE_OPTIONS = {"embedding_dim": 64, "dense_arch": (32, 64), "over_arch": (64, 32)}
#: the attribute tables and every MLP layer adapt; user and item tables stay as pretrained
LORA = LoraConfig(
    r=4,
    lora_alpha=8,
    target_modules=click_model_lora_targets(
        SHOP_SCHEMA.sparse_features,
        len(BASE_OPTIONS["dense_arch"]),
        len(BASE_OPTIONS["over_arch"]),
        frozen_features=(SHOP_SCHEMA.user, SHOP_SCHEMA.item),
    ),
)
