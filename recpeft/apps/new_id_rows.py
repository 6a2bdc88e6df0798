"""New-id rows for the command line's click model: a segment's ids the base never saw get rows
of the adapter's own (:mod:`recpeft.datasets.new_ids` for the ids, :mod:`recpeft.layers.new_rows`
for the math).

- ``finetune --new-id-rows customer``: the values of the segment's *training* rows that the base's
  encoder maps to its new-id row get ids V … V + m − 1 (:func:`segment_new_ids`); the segment's
  data is encoded with them (:func:`encoded_with`), the LoRA config targets those tables with
  ``new_rows`` (:func:`lora_with_new_rows`), and the adapter's folder keeps the values as
  ``new_ids.json``. Values only in the validation or test rows stay unseen: no row would train.
- evaluate, score, serve: the folder's values, checked against the adapter's ``new_rows``
  (:func:`read_new_ids`), encode the rows that adapter serves.
- merge: the merged table keeps the new-id row last and the merged encoder's vocabulary ends with
  the new values (:func:`merge_new_ids`), so the merged folder is a base like any other.

Example::

    new = segment_new_ids(data, "CH", ["customer"])
    lora = lora_with_new_rows(LoraConfig(r=4, target_modules=[...]), new_rows_of(new))
    adapted_data = encoded_with(data, NewIdEncoder(data.encoder, new))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from recpeft.datasets import FeatureEncoder
from recpeft.datasets.new_ids import NewIdEncoder, NewIds, oov_last_order
from recpeft.models.dlrm import ClickDLRM, table_name
from recpeft.peft.config import LoraConfig

from .workflow import EncodedSplit

#: in an adapter's folder: the values of its new ids (:class:`NewIds`)
NEW_IDS = "new_ids.json"
COLLECTION = "sparse_arch.embedding_bag_collection"


def new_rows_key(feature: str) -> str:
    """The ``LoraConfig.new_rows`` key of ``feature``'s table in a :class:`ClickDLRM`."""
    return f"{COLLECTION}.{table_name(feature)}"


def new_id_features(text: str | None, encoder: FeatureEncoder, flag: str = "--new-id-rows") -> list[str]:
    """The features ``text`` names (comma-separated), each a sparse feature of the base."""
    features = [f for f in (text or "").split(",") if f]
    known = list(encoder.schema.sparse_features)
    unknown = [f for f in features if f not in known]
    if unknown:
        raise ValueError(f"{flag} {','.join(unknown)}: not a sparse feature of the base; its features are {known}")
    return features


def segment_new_ids(data: EncodedSplit, segment: str, features: Iterable[str]) -> NewIds:
    """The values of ``features`` in ``segment``'s training rows that the base's encoder never saw."""
    train = data.split.train
    if data.schema.segment is not None:
        train = train[train[data.schema.segment].astype(str) == segment]
    return NewIds.unseen_in(data.encoder, train, features)


def encoded_with(data: EncodedSplit, encoder: FeatureEncoder) -> EncodedSplit:
    """``data``'s rows, every part, encoded by ``encoder`` instead."""
    parts = {
        part: encoder.transform(getattr(data.split, part), unseen="oov", name=f"{part} rows")
        for part in ("train", "valid", "test")
    }
    return dataclasses.replace(data, encoder=encoder, **parts)


def new_rows_of(new_ids: NewIds) -> dict[str, int]:
    """``LoraConfig.new_rows`` for ``new_ids``: table → its number of new ids."""
    return {new_rows_key(f): m for f, m in new_ids.counts.items()}


def lora_with_new_rows(lora: LoraConfig, rows: dict[str, int]) -> LoraConfig:
    """``lora`` that also targets every table of ``rows`` (table → n) and gives it n rows of its
    own, each starting as the table's new-id row (the last, −1)."""
    targets = list(lora.target_modules or [])
    targets += [key for key in rows if key not in targets]
    return dataclasses.replace(lora, target_modules=targets, new_rows=rows or None, new_id_row=-1)


def read_new_ids(folder: str | Path, encoder: FeatureEncoder, config: LoraConfig) -> NewIdEncoder | None:
    """The encoder of the adapter in ``folder`` (``config``, its LoraConfig): ``encoder`` with its
    new ids, or None when it has none; ValueError naming the file where the values do not match
    the adapter's ``new_rows``."""
    path = Path(folder) / NEW_IDS
    rows = dict(config.new_rows or {})
    if not path.is_file():
        if rows:
            raise ValueError(f"{folder}: the adapter has new-id rows on {sorted(rows)} but no {NEW_IDS} for their ids")
        return None
    new = NewIds.from_json(path.read_text(), name=str(path))
    named = new_rows_of(new)
    if named != rows:
        raise ValueError(f"{path}: ids for {named} but the adapter's new_rows (adapter_config.json) are {rows}")
    return NewIdEncoder(encoder, new, name=str(path))


@torch.no_grad()
def merge_new_ids(merged: ClickDLRM, encoder: NewIdEncoder) -> tuple[ClickDLRM, FeatureEncoder]:
    """A merged model whose tables merging extended to V + m rows (new-id row V − 1, then the new
    ids) as a base: each such table's rows reordered by :func:`oov_last_order` (new-id row last),
    its config and ``spec`` to match, and the merged encoder (:meth:`NewIdEncoder.merged`)."""
    bags = merged.sparse_arch.embedding_bag_collection.embedding_bags
    cardinalities = dict(merged.spec["cardinalities"])
    for feature, count in encoder.new_ids.counts.items():
        vocabulary = encoder.cardinalities[feature] - 1
        bag = bags[table_name(feature)]
        if bag.weight.shape[0] != vocabulary + 1 + count:
            raise ValueError(f"{table_name(feature)}: {bag.weight.shape[0]} rows after merging, expected "
                             f"{vocabulary + 1 + count} (the base's {vocabulary + 1} and {count} new ids)")  # fmt: skip
        bag.weight = nn.Parameter(bag.weight[oov_last_order(vocabulary, count)].clone(), requires_grad=False)
        cardinalities[feature] = vocabulary + 1 + count
    merged.spec = {**merged.spec, "cardinalities": cardinalities}
    return merged, encoder.merged()
