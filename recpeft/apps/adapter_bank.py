"""AdapterBank: one base click model serving many segments' adapters at once.

Load a base checkpoint, then adapter folders (one per segment: market, cohort, ...), each checked
against the base before it serves — its record of the base it was trained on (``recpeft_base.json``,
written by ``recpeft finetune``), its config, its tensors' keys, shapes and sha256 — so that a bad
folder is refused with a reason while every other adapter keeps serving. Scoring a table of rows
runs each row through its own segment's adapter in one routed pass per chunk (rows sorted by adapter
first, so that every chunk arrives grouped), the adapter chosen by
the row's segment name (so a segment the base was pretrained without is served by its adapter;
rows of segments without an adapter get the base alone); a chunk whose rows all use one adapter
runs that adapter alone, unrouted (the layers' single-adapter path, which merges
on the fly where that is faster). Adapters can be added and removed while serving; the others are
not reloaded. An adapter with new-id rows (``new_ids.json``, :mod:`.new_id_rows`) encodes the rows it
serves with its own ids for the values the base never saw (:meth:`AdapterBank.with_new_ids`).

Example::

    bank = AdapterBank("runs/base")
    refused = bank.add_folders({"DE": "adapters/DE", "FR": "adapters/FR"})   # {name: reason}
    scores = bank.score(frame)            # click probabilities, one per row, by frame's segment column
    logits = bank.logits(encoded, names)  # the same from encoded rows and their segment names
    bank.remove("FR")
    bank.memory_bytes()                   # {"DE": 21_504}
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recpeft.datasets import ClickBatches, EncodedInteractions
from recpeft.datasets.encoding import PAD
from recpeft.datasets.interactions import canonical_text
from recpeft.datasets.new_ids import NewIdEncoder
from recpeft.kernels.reference import unchanged_factors
from recpeft.peft.config import LoraConfig
from recpeft.peft.model import PeftModel
from recpeft.utils.devices import AUTO, resolve_device
from recpeft.utils.tensor_bytes import tensor_bytes

from .base_checkpoint import check_base_fingerprint, load_base
from .new_id_rows import read_new_ids

#: a bank's generations, unique in the process: a new one on every add and remove
_GENERATIONS = itertools.count()


class AdapterRefused(ValueError):
    """An adapter folder that does not fit the bank's base; the message names it and why."""


class AdapterBank:
    """A base checkpoint (``base_dir``) on ``device`` and the adapters added to it, by name.

    Names are the segments they serve (the values of the base's segment column)."""

    def __init__(self, base_dir: str | Path, *, device: str | torch.device | None = AUTO, chunk_rows: int = 8192):
        self.base_dir = Path(base_dir)
        self.device = resolve_device(device)
        self.chunk_rows = chunk_rows
        base, self.encoder = load_base(self.base_dir)
        self._base = base.to(self.device).eval()
        self._peft: PeftModel | None = None
        self.folders: dict[str, Path] = {}
        self._new_ids: dict[str, NewIdEncoder] = {}  # the adapters with new-id rows: their encoders
        self._ids_of: tuple[tuple[str, ...], dict[str, int]] | None = None
        # names the current set of adapters for the layers' routed lists (unchanged_factors)
        self._generation = next(_GENERATIONS)

    # ---- adapters ------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        """The adapters serving, in the order they were added."""
        return tuple(self.folders)

    def add(self, name: str, folder: str | Path, *, ignore_base_mismatch: bool = False) -> None:
        """Serve the adapter in ``folder`` for segment ``name``; AdapterRefused (naming the folder
        and the reason) when it does not fit the base, leaving the bank as it was.
        ``ignore_base_mismatch``: serve it even where its record names another base (its tensors
        must still fit)."""
        folder = Path(folder)
        if name in self.folders:
            raise AdapterRefused(f"adapter {name!r} is already serving (from {self.folders[name]}); remove it first")
        try:
            check_base_fingerprint(folder, self.base_dir, ignore_base_mismatch)
            new_ids = read_new_ids(folder, self.encoder, LoraConfig.from_pretrained(folder))
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, folder, adapter_name=name)
            else:
                self._peft.load_adapter(folder, adapter_name=name)
        except (ValueError, OSError, RuntimeError) as exc:
            raise AdapterRefused(f"adapter {name!r} ({folder}) refused: {exc}") from exc
        finally:  # a refused load may have touched layers before it was rolled back
            self._generation = next(_GENERATIONS)
        # an adapter's parameters are made on its base weights' device, which is already ours
        self._peft.eval()
        self.folders[name] = folder
        if new_ids is not None:
            self._new_ids[name] = new_ids

    def add_folders(self, folders: Mapping[str, str | Path], *, ignore_base_mismatch: bool = False) -> dict[str, str]:
        """Add every ``name: folder``; the refused ones are left out and returned as {name: reason}."""
        refused = {}
        for name, folder in folders.items():
            try:
                self.add(name, folder, ignore_base_mismatch=ignore_base_mismatch)
            except AdapterRefused as exc:
                refused[name] = str(exc)
        return refused

    def remove(self, name: str) -> None:
        """Stop serving ``name``; the other adapters stay loaded as they are."""
        if name not in self.folders:
            raise KeyError(f"no adapter {name!r} is serving; serving: {list(self.names)}")
        try:
            self._peft.delete_adapter(name)
        finally:
            self._generation = next(_GENERATIONS)
        del self.folders[name]
        self._new_ids.pop(name, None)

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of each adapter's parameters (A, B, and what else it trains) on the device."""
        holders = self._peft.adapter_holders().values() if self._peft is not None else []
        return {
            name: sum(tensor_bytes(p) for h in holders if h.has_adapter(name) for p in h.adapter_parameters(name))
            for name in self.names
        }

    # ---- scoring -------------------------------------------------------------------------------

    def score(self, frame: pd.DataFrame, *, name: str = "DataFrame") -> torch.Tensor:
        """Click probabilities float32 [N] for the rows of ``frame`` (the base's feature columns and
        its segment column; a label column is not needed), each row through the adapter named by
        its segment, or the base where none is. Ids the base never saw use its out-of-vocabulary
        rows."""
        schema = self.encoder.schema
        if schema.segment is None or schema.segment not in frame.columns:
            raise ValueError(f"{name}: no segment column {schema.segment!r}: it names each row's adapter")
        names = canonical_text(frame[schema.segment]).str.strip().tolist()  # as the encoder reads segment names
        encoded = self.with_new_ids(frame, self.encoder.transform(frame, unseen="oov", name=name), names, name=name)
        return torch.sigmoid(self.logits(encoded, names))

    def with_new_ids(
        self, frame: pd.DataFrame, encoded: EncodedInteractions, segments: Sequence[str], *, name: str = "DataFrame"
    ) -> EncodedInteractions:
        """``encoded`` (``frame``'s rows by :attr:`encoder`) with the rows each adapter with new-id
        rows serves (by ``segments``, [N] names) encoded by that adapter's encoder: its new values
        get its own ids V + j. ``encoded`` itself where no such adapter serves a row."""
        names = pd.Series(list(segments), dtype=object)
        sparse, changed = dict(encoded.sparse), set()
        for adapter, encoder in self._new_ids.items():
            rows = np.flatnonzero((names == adapter).to_numpy())
            if rows.size == 0:
                continue
            own = encoder.transform(frame.iloc[rows], unseen="oov", name=name).sparse
            for feature in encoder.new_ids.counts:
                ids = own[feature]
                if ids.dim() == 2:  # a bag feature: the rows' bags, padded to the frame's width
                    ids = torch.nn.functional.pad(ids, (0, sparse[feature].shape[1] - ids.shape[1]), value=PAD)
                if feature not in changed:
                    sparse[feature], changed = sparse[feature].clone(), changed | {feature}
                sparse[feature][torch.from_numpy(rows)] = ids
        return dataclasses.replace(encoded, sparse=sparse) if changed else encoded

    def adapter_ids(self, segments: Sequence[str]) -> torch.Tensor:
        """int64 [N]: each row's adapter (its routing id, ``PeftModel.adapter_names`` order) by its
        segment name, −1 (the base alone) where no adapter of that name serves."""
        order = self._routing_ids()
        return torch.tensor([order.get(name, -1) for name in segments], dtype=torch.int64)

    def _routing_ids(self) -> dict[str, int]:
        """{adapter name: routing id}, kept while the adapters are the same."""
        names = self._adapter_order()
        if self._ids_of is None or self._ids_of[0] != names:
            self._ids_of = (names, {name: i for i, name in enumerate(names)})
        return self._ids_of[1]

    def logits(self, encoded: EncodedInteractions, segments: Sequence[str] | None = None) -> torch.Tensor:
        """Logits float32 [N] of ``encoded`` rows (encoded by :attr:`encoder`), each row through the
        adapter its name in ``segments`` ([N] segment names) names (:meth:`adapter_ids`), in chunks
        of :attr:`chunk_rows`; ``segments`` None: every row through the base alone."""
        if encoded.labels is None:  # labels are not used when scoring
            encoded = dataclasses.replace(encoded, labels=torch.zeros(len(encoded)))
        if segments is not None and len(segments) != len(encoded):
            raise ValueError(f"AdapterBank.logits: {len(segments)} segment names for {len(encoded)} rows")
        ids = None if segments is None else self.adapter_ids(segments)
        # rows in adapter order: every chunk arrives grouped (its layers work on slices) and most
        # chunks of a large request use one adapter alone, unrouted
        order = torch.arange(len(encoded)) if ids is None else torch.argsort(ids, stable=True)
        rows, out = ClickBatches(encoded), []
        # the bank changes no factor in place (add and remove make new parameters, and a new
        # generation)
        with torch.no_grad(), unchanged_factors(self._generation):
            for start in range(0, len(rows), self.chunk_rows):
                index = order[start : start + self.chunk_rows]
                batch = rows.batch(index).to(self.device)
                chunk_ids = None if ids is None else ids[index].to(self.device)
                out.append(self._forward(batch.args, chunk_ids).float().cpu())
        if not out:
            return torch.zeros(0)
        return torch.empty(len(encoded)).index_copy_(0, order, torch.cat(out))

    def _adapter_order(self) -> tuple[str, ...]:
        """Adapter names by routing id (PeftModel.adapter_names)."""
        return self._peft.adapter_names if self._peft is not None else ()

    def _forward(self, args, adapter_ids: torch.Tensor | None) -> torch.Tensor:
        """One chunk: the base alone, one adapter alone (unrouted) or a routed mix."""
        if self._peft is None or adapter_ids is None or bool((adapter_ids < 0).all()):
            if self._peft is None:
                return self._base(*args)
            with self._peft.disable_adapter():
                return self._peft(*args)
        first = int(adapter_ids[0])
        if first >= 0 and bool((adapter_ids == first).all()):
            self._peft.set_adapter(self._adapter_order()[first])
            return self._peft(*args)
        return self._peft(*args, adapter_ids=adapter_ids)
