"""The personalisation workflow behind ``recpeft demo | pretrain | finetune | evaluate``.

1. :func:`prepare`: split an interaction table by time per segment (train, validation = the
   latest training rows, test = the rows after the cut) and encode it with the base's encoder
   (ids the encoder never saw map to each table's out-of-vocabulary row): an :class:`EncodedSplit`.
   For pretraining, a :class:`SegmentRule` leaves segments out (excluded by name, too small, or
   lacking train, validation or test rows) before the encoder is fitted: the base never sees them.
2. :func:`pretrain`: a torchrec click model (``build_click_model``) trained on every segment's
   training rows, early-stopped on every segment's validation rows.
3. :func:`finetune`: one segment's training rows, either a LoRA adapter on a frozen copy of the
   base (``Method.LORA``) or every parameter of a copy (``Method.DENSE``), both made by
   :func:`make_trainable`, early-stopped on the segment's validation rows, with the same Trainer.
4. :func:`click_metrics`: AUC and LogLoss on a segment's test rows (:func:`logit_metrics` from
   logits already computed, e.g. by a routed pass over many adapters).

Example::

    data = prepare(frame, schema, test_start="2026-03-12")
    base, _ = pretrain(data, model_options={"embedding_dim": 32}, train_config=TrainConfig(epochs=5))
    adapted, report = finetune(base, data, "DE", Method.LORA, train_config=TrainConfig(lr=3e-3),
                               lora_config=LoraConfig(r=4, target_modules=[...]))
    print(click_metrics(adapted, data.segment_rows("test", "DE")))
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Collection
from dataclasses import dataclass, field, replace

import pandas as pd
import torch
from torch import nn

from recpeft.datasets import ClickBatches, EncodedInteractions, FeatureEncoder, Schema, TimeSplit, split_by_time
from recpeft.datasets.splits import ALL_ROWS
from recpeft.metrics import auc, log_loss
from recpeft.models.dlrm import ClickDLRM, build_click_model
from recpeft.peft.config import LoraConfig
from recpeft.peft.model import get_peft_model
from recpeft.train.trainer import FitReport, TrainConfig, Trainer, predict
from recpeft.utils.devices import AUTO


class Method(str, enum.Enum):
    """How a segment's model is fine-tuned."""

    LORA = "lora"  # low-rank adapters on a frozen copy of the base
    DENSE = "dense"  # every parameter of a copy of the base, the baseline LoRA must match


@dataclass(frozen=True)
class SegmentRule:
    """Which segments a base is pretrained without: those named in ``exclude`` (a market the base
    must never see, to be fine-tuned as a new one), those with fewer than ``min_rows`` rows, and
    those the time split left without train, validation or test rows."""

    exclude: tuple[str, ...] = ()
    min_rows: int = 0

    def left_out(self, split: TimeSplit) -> dict[str, str]:
        """Segment → why the rule leaves it out, for the segments of ``split`` it leaves out
        (names in ``exclude`` that ``split`` lacks are ignored)."""
        reasons = {}
        for name, counts in split.counts.items():
            empty = split.empty_parts(name)
            if name in self.exclude:
                reasons[name] = "excluded by name"
            elif sum(counts) < self.min_rows:
                reasons[name] = f"{sum(counts):,} rows, under the minimum {self.min_rows:,}"
            elif empty:
                reasons[name] = f"empty {'/'.join(empty)} part: train/valid/test rows {'/'.join(map(str, counts))}"
        return reasons


@dataclass
class EncodedSplit:
    """An interaction table split by time per segment (``split``, the raw rows) and encoded by
    ``encoder``: the ``train``, ``valid`` and ``test`` rows of every segment, ready for a model.
    ``left_out``: segment → reason, for the segments :func:`prepare`'s rule removed."""

    schema: Schema
    encoder: FeatureEncoder
    split: TimeSplit
    train: EncodedInteractions
    valid: EncodedInteractions
    test: EncodedInteractions
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def segments(self) -> list[str]:
        """The segments of this data (sorted), whether or not the encoder's base saw them; data
        without a segment column is one segment, ``ALL_ROWS``."""
        if self.schema.segment is None:
            return [ALL_ROWS]
        frames = (self.split.train, self.split.valid, self.split.test)
        return sorted({str(v) for f in frames for v in f[self.schema.segment].unique()})

    def segment_rows(self, part: str, segment: str | Collection[str] | None = None) -> ClickBatches:
        """Batches of ``part`` ("train" | "valid" | "test"), of one segment or several (by their
        names in the data, so a segment the base never saw works too) or of all of them."""
        if part not in ("train", "valid", "test"):
            raise ValueError(f"part must be train, valid or test, got {part!r}")
        rows = getattr(self, part)
        names = {segment} if isinstance(segment, str) else segment
        if names is None or (self.schema.segment is None and ALL_ROWS in names):
            return ClickBatches(rows)
        if self.schema.segment is None:
            raise ValueError(f"segment {segment!r}: the data has no segment column")
        mask = getattr(self.split, part)[self.schema.segment].astype(str).isin(names).to_numpy(copy=True)
        return ClickBatches(rows.select(torch.from_numpy(mask)))

    def unseen_share(self, part: str = "train", segment: str | Collection[str] | None = None) -> dict[str, float]:
        """Per sparse feature, the share of ``part``'s rows (of ``segment``, one or several) whose id
        the encoder never saw (they use the table's out-of-vocabulary row, the last)."""
        encoded = self.segment_rows(part, segment).encoded
        if len(encoded) == 0:
            return {}
        oov = {f: n - 1 for f, n in self.encoder.cardinalities.items()}
        return {f: float((ids == oov[f]).double().mean()) for f, ids in encoded.sparse.items()}


def prepare(
    frame: pd.DataFrame,
    schema: Schema,
    *,
    encoder: FeatureEncoder | None = None,
    test_start=None,
    test_fraction: float = 0.2,
    valid_fraction: float = 0.15,
    name: str = "data",
    leave_out: SegmentRule | None = None,
) -> EncodedSplit:
    """Split ``frame`` by time (``split_by_time``) and encode it.

    Without ``encoder`` one is fitted on the rows before the test cut (train and validation), as a
    base's pretraining would; with one (a saved base's), its vocabularies are used unchanged and
    ids it never saw map to each table's out-of-vocabulary row (see ``EncodedSplit.unseen_share``).
    The latest ``valid_fraction`` of each segment's rows before its test cut are its validation rows.
    A segment without train or test rows is kept (fine-tuning it fails, scoring it is undefined);
    ``leave_out`` removes the segments it names (:meth:`SegmentRule.left_out`) before the encoder is
    fitted, and refuses to leave none.
    """
    split = split_by_time(
        frame, schema, test_start=test_start, test_fraction=test_fraction, valid_fraction=valid_fraction, strict=False
    )
    left_out = leave_out.left_out(split) if leave_out is not None else {}
    if left_out:
        split = _without(split, schema, left_out)
    if encoder is None:
        encoder = FeatureEncoder().fit(pd.concat([split.train, split.valid]), schema)
    parts = {
        part: encoder.transform(getattr(split, part), unseen="oov", name=f"{name} ({part} rows)")
        for part in ("train", "valid", "test")
    }
    return EncodedSplit(schema, encoder, split, **parts, left_out=left_out)


def _without(split: TimeSplit, schema: Schema, segments: dict[str, str]) -> TimeSplit:
    """``split`` less the rows, cuts and counts of ``segments`` (name → why); refused, with the
    reasons, if nothing is left (always so without a segment column: its one group is left out)."""
    kept = [name for name in split.counts if name not in segments]
    if not kept:
        reasons = "; ".join(f"{name}: {why}" for name, why in segments.items())
        raise ValueError(f"every segment is left out ({reasons}); check the timestamps, the cuts and the rule")
    parts = {
        part: frame[~frame[schema.segment].astype(str).str.strip().isin(segments)]
        for part, frame in (("train", split.train), ("valid", split.valid), ("test", split.test))
    }
    return TimeSplit(
        **parts,
        cuts={n: split.cuts[n] for n in kept},
        counts={n: split.counts[n] for n in kept},
        expects_valid=split.expects_valid,
    )


def pretrain(
    data: EncodedSplit,
    *,
    model_options: dict | None = None,
    train_config: TrainConfig | None = None,
    device: str | torch.device | None = AUTO,
    new_id_share: float = 0.0,
) -> tuple[ClickDLRM, FitReport]:
    """A base click model over the encoder's features, trained on every segment's training rows
    on ``device`` (where the model stays: :func:`recpeft.utils.devices.resolve_device`).
    ``new_id_share``: that share of the training ids (fixed per row and feature) is fed as the
    feature's out-of-vocabulary id, so that row learns what an id the base never saw — a new
    customer, a new product — looks like (:class:`recpeft.datasets.ClickBatches`)."""
    seed = (train_config or TrainConfig()).seed
    torch.manual_seed(seed)
    train = data.segment_rows("train")
    if new_id_share:
        new_ids = {f: n - 1 for f, n in data.encoder.cardinalities.items() if f in train.encoded.sparse}
        train = ClickBatches(train.encoded, new_id_share=new_id_share, new_ids=new_ids, seed=seed)
    model = build_click_model(data.encoder.cardinalities, train.num_dense, **(model_options or {}))
    valid = data.segment_rows("valid") if len(data.valid) else None
    report = Trainer(model, train_config, device=device).fit(train, valid, resume=False)
    return model.eval(), report


def make_trainable(model: nn.Module, method: Method, lora_config: LoraConfig | None = None) -> nn.Module:
    """``model`` itself (changed in place, its train/eval mode kept) ready to fine-tune:
    ``Method.LORA`` wraps it with ``lora_config``'s adapters and freezes the rest, ``Method.DENSE``
    makes every parameter trainable. The dense and LoRA arms of every comparison start here."""
    if Method(method) is Method.LORA:
        if lora_config is None:
            raise ValueError("LoRA fine-tuning needs a lora_config")
        return get_peft_model(model, lora_config)
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model


def trainable_copy(base: nn.Module, method: Method, lora_config: LoraConfig | None = None) -> nn.Module:
    """A copy of ``base`` ready to fine-tune (:func:`make_trainable`); ``base`` is left as it is."""
    return make_trainable(copy.deepcopy(base), method, lora_config)


def finetune(
    base: nn.Module,
    data: EncodedSplit,
    segment: str,
    method: Method,
    *,
    train_config: TrainConfig,
    lora_config: LoraConfig | None = None,
    device: str | torch.device | None = AUTO,
) -> tuple[nn.Module, FitReport]:
    """Fine-tune a copy of ``base`` on ``segment``'s training rows on ``device``, early-stopped
    on its validation rows."""
    if segment not in data.segments:
        raise ValueError(f"unknown segment {segment!r}; the data's segments are {data.segments}")
    train, valid = data.segment_rows("train", segment), data.segment_rows("valid", segment)
    if len(train) == 0:
        raise ValueError(f"segment {segment!r} has no training rows before the time cut")
    torch.manual_seed(train_config.seed)  # the adapters' initialisation follows the seed, as training does
    model = trainable_copy(base, method, lora_config)
    config = replace(train_config, desc=f"{Method(method).value} {segment}")
    report = Trainer(model, config, device=device).fit(train, valid if len(valid) else None, resume=False)
    return model.eval(), report


def auc_undefined(labels: torch.Tensor, part: str = "test") -> str | None:
    """Why AUC is undefined on rows with these 0/1 ``labels`` (no rows, or only one label), or None."""
    if labels.numel() == 0:
        return f"there are no {part} rows"
    positives = int((labels > 0.5).sum())
    if positives in (0, labels.numel()):
        return f"the {part} rows hold only one label ({int(positives > 0)})"
    return None


@torch.no_grad()
def click_metrics(model: nn.Module, source: ClickBatches, batch_size: int = 8192, *, part: str = "test") -> dict:
    """AUC, LogLoss, rows and click rate of ``model``'s logits on ``source`` (``part``'s rows)
    (:func:`logit_metrics`)."""
    return logit_metrics(predict(model, source, batch_size), source.encoded.labels, part=part)


def logit_metrics(logits: torch.Tensor, labels: torch.Tensor, *, part: str = "test") -> dict:
    """AUC, LogLoss, rows and click rate of ``logits`` [N] against 0/1 ``labels`` [N] (``part``'s
    rows). Where AUC is undefined (no rows, or one label only) it is NaN and ``auc_undefined``
    says why."""
    reason = auc_undefined(labels, part)
    rows = int(labels.numel())
    metrics = {
        "auc": auc(logits, labels) if reason is None else float("nan"),
        "log_loss": log_loss(logits, labels) if rows else float("nan"),
        "rows": rows,
        "click_rate": float(labels.float().mean()) if rows else float("nan"),
    }
    if reason is not None:
        metrics["auc_undefined"] = reason
    return metrics
