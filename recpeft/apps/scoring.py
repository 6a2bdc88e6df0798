"""A base with many segments' adapters at work: ``recpeft evaluate --adapters`` and ``recpeft score``.

A folder of adapters, as ``recpeft finetune --segments`` writes it (:func:`find_adapter_folders`):

    DIR/<segment>/          a LoRA adapter (adapter_config.json): serves rows of <segment>
    DIR/<segment>-dense/    a dense copy of the base (model_config.json): a base checkpoint of its
                            own, not an adapter, so it cannot join a routed pass; it is listed and
                            left out (score it with ``--base DIR/<segment>-dense``)
    DIR/summary.json ...    anything else is ignored

Both commands load the base and every LoRA adapter into one :class:`~.adapter_bank.AdapterBank`,
and every row goes through the adapter its segment names, in one routed pass per chunk; a row of a
segment without an adapter goes through the base alone, and is marked so. An adapter with new-id
rows encodes the rows it serves with its own ids (:meth:`AdapterBank.with_new_ids`).

:func:`routed_evaluation`: per segment, the base's and the routed model's AUC and LogLoss on one
part of an :class:`~.workflow.EncodedSplit`; :func:`~.finetune_summary.weighted_row` adds the
impression-weighted row (Σ_g n_g·m_g / Σ_g n_g over the segments where m is defined).

:func:`score_file`: click probabilities σ(logit) for the rows of a file (no label needed), read and
scored ``chunk_rows`` at a time (CSV and Parquet are streamed; other formats are loaded, then
scored in chunks), written to a Parquet or CSV file (by its suffix) atomically
(:func:`recpeft.utils.atomic.atomic_path`). Output columns: ``row`` (the row's 0-based position
in the input, to join back), the base's user and item columns, its segment column, ``adapter``
(the adapter that scored the row, empty for the base alone) and ``score``.

Example::

    bank = AdapterBank("runs/base")
    folders = find_adapter_folders("runs/adapters")
    bank.add_folders(folders.lora)
    rows = routed_evaluation(bank, data, "test", data.segments)
    score_file(bank, "new.parquet", "scores.parquet", chunk_rows=16384)
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from recpeft.datasets import Schema
from recpeft.datasets.interactions import CSV_SUFFIXES, PARQUET_SUFFIXES, load_interactions
from recpeft.datasets.sources import Roles, load_source, resolve_format
from recpeft.utils.atomic import atomic_path

from .adapter_bank import AdapterBank
from .workflow import EncodedSplit, logit_metrics

ADAPTER_CONFIG, BASE_CONFIG = "adapter_config.json", "model_config.json"
DENSE_SUFFIX = "-dense"
#: what ``score_file`` writes, by the output's suffix
OUTPUT_KINDS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv"}
#: the output's own columns (beside the base's user, item and segment columns)
ROW, ADAPTER, SCORE = "row", "adapter", "score"


@dataclass(frozen=True)
class AdapterFolders:
    """The models under one folder: ``lora`` segment → LoRA adapter folder, ``dense`` segment →
    dense copy (a base checkpoint; not routable)."""

    root: Path
    lora: dict[str, Path]
    dense: dict[str, Path]


def find_adapter_folders(root: str | Path, flag: str = "--adapters") -> AdapterFolders:
    """The adapter folders directly under ``root`` (see the module docstring); a folder holding
    no LoRA adapter is refused, naming ``flag``."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{flag} {root}: not a folder (it should hold <segment>/ adapter folders)")
    if (root / ADAPTER_CONFIG).is_file():
        raise ValueError(f"{flag} {root} is one adapter folder, not a folder of them: pass it with --adapter")
    lora, dense = {}, {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / ADAPTER_CONFIG).is_file():
            lora[folder.name] = folder
        elif (folder / BASE_CONFIG).is_file():
            dense[folder.name.removesuffix(DENSE_SUFFIX)] = folder
    if not lora:
        raise ValueError(
            f"{flag} {root} holds no adapter folder (<segment>/{ADAPTER_CONFIG}), as `recpeft finetune --segments` "
            "writes them"
        )
    return AdapterFolders(root, lora, dense)


def routed_evaluation(bank: AdapterBank, data: EncodedSplit, part: str, segments: list[str]) -> list[dict]:
    """One row per segment of ``segments``: ``rows``, ``click_rate``, ``adapter`` (the bank's
    adapter serving it, or None: the base alone), ``base_{auc,log_loss}`` and
    ``adapted_{auc,log_loss}`` (the routed pass; the base's own figures where no adapter serves)
    on ``part``'s rows, and ``auc_undefined`` where AUC is undefined. One routed pass scores every
    row; the base scores them in a pass of its own."""
    schema = data.schema
    encoded = getattr(data, part)
    names = (
        getattr(data.split, part)[schema.segment].astype(str).tolist()
        if schema.segment
        else [segments[0]] * len(encoded)
    )
    own = bank.with_new_ids(getattr(data.split, part), encoded, names)  # adapters' new ids, where they serve
    base, adapted = bank.logits(encoded), bank.logits(own, names)
    labels, by_segment = encoded.labels, pd.Series(names)
    rows = []
    for segment in segments:
        mask = torch.from_numpy((by_segment == segment).to_numpy(copy=True))
        before = logit_metrics(base[mask], labels[mask], part=part)
        after = logit_metrics(adapted[mask], labels[mask], part=part)
        row = {"segment": segment, "rows": before["rows"], "click_rate": before["click_rate"]}
        row["adapter"] = segment if segment in bank.folders else None
        row.update({f"base_{k}": before[k] for k in ("auc", "log_loss")})
        row.update({f"adapted_{k}": after[k] for k in ("auc", "log_loss")})
        if "auc_undefined" in before:
            row["auc_undefined"] = before["auc_undefined"]
        rows.append(row)
    return rows


# ---- scoring new rows ------------------------------------------------------------------------


def scoring_schema(schema: Schema) -> Schema:
    """The columns scoring reads: the base's features and segment column (no label, no time)."""
    return Schema(**{**schema.to_dict(), "label": None, "timestamp": None})


def output_kind(path: str | Path, flag: str = "--output") -> str:
    """``parquet`` or ``csv``, by ``path``'s suffix; another suffix is refused."""
    kind = OUTPUT_KINDS.get(Path(path).suffix.lower())
    if kind is None:
        raise ValueError(f"{flag} {path}: name a .parquet (or .pq) or .csv file; the suffix picks the format")
    return kind


def _csv_rows(path: Path) -> int:
    """Data rows of a CSV file (lines after the header; a quoted field holding line breaks makes
    this an over-count, which only a progress bar's total uses)."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as handle:
        lines, last = 0, b"\n"
        for block in iter(lambda: handle.read(1 << 20), b""):
            lines, last = lines + block.count(b"\n"), block[-1:]
    return max(0, lines + (last != b"\n") - 1)


def _present(schema: Schema, available, name: str, optional: tuple[str, ...]) -> Schema:
    """``schema`` less its ``optional`` columns that ``available`` lacks; any other missing column
    is refused, naming ``name``."""
    available = [str(c) for c in available]
    missing = [c for c in schema.columns if c not in available and c not in optional]
    if missing:
        raise ValueError(f"{name}: missing column(s) {missing} the base reads; the available columns are {available}")
    if schema.segment and schema.segment not in available:
        return Schema(**{**schema.to_dict(), "segment": None})
    return schema


def read_chunks(
    path: str | Path, fmt: str, schema: Schema, roles: Roles, chunk_rows: int, *, need_segment: bool = True
) -> tuple[int, Schema, Iterator[tuple[int, pd.DataFrame]]]:
    """(row count, the columns read, iterator of (first row, frame)) over ``path``'s rows,
    ``chunk_rows`` at a time, checked and normalised as ``load_interactions`` does (``schema``:
    :func:`scoring_schema`; its segment column may be absent unless ``need_segment``). CSV and
    Parquet interaction logs are streamed; other formats are read whole first."""
    path = Path(path)
    fmt = resolve_format(path, fmt)
    lower, name = path.name.lower(), str(path)
    optional = () if need_segment or not schema.segment else (schema.segment,)
    if fmt == "interactions" and lower.endswith(PARQUET_SUFFIXES):
        import pyarrow.parquet as pq

        try:
            handle = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise ValueError(f"{path}: not a valid Parquet file: {' '.join(str(exc).split())}") from None
        schema = _present(schema, handle.schema_arrow.names, name, optional)
        batches = (b.to_pandas() for b in handle.iter_batches(batch_size=chunk_rows, columns=list(schema.columns)))
        return handle.metadata.num_rows, schema, _checked(batches, schema, name)
    if fmt == "interactions" and lower.endswith(CSV_SUFFIXES):
        schema = _present(schema, pd.read_csv(path, nrows=0).columns, name, optional)
        text = {c: str for c in (*schema.sparse_features, *([schema.segment] if schema.segment else []))}
        reader = pd.read_csv(
            path,
            usecols=list(schema.columns),
            dtype=text,
            keep_default_na=False,
            na_values=[""],
            chunksize=chunk_rows,
        )
        return _csv_rows(path), schema, _checked(reader, schema, name)
    if fmt == "interactions":
        raise ValueError(f"{path}: unknown file type; use one of {CSV_SUFFIXES + PARQUET_SUFFIXES}")
    frame, _ = load_source(path, fmt, roles)
    schema = _present(schema, frame.columns, name, optional)
    chunks = (frame.iloc[start : start + chunk_rows] for start in range(0, len(frame), chunk_rows))
    return len(frame), schema, _checked(chunks, schema, name)


def _checked(chunks, schema: Schema, name: str) -> Iterator[tuple[int, pd.DataFrame]]:
    """(first row, chunk checked by ``load_interactions``); a bad value is named by its row's
    0-based position in the whole input (the ``row`` column of the output)."""
    start = 0
    for chunk in chunks:
        chunk = chunk.loc[:, list(schema.columns)]
        chunk.index = pd.RangeIndex(start, start + len(chunk))
        yield start, load_interactions(chunk, schema, name=name)
        start += len(chunk)


class _Writer:
    """Appends frames to a Parquet or CSV file at ``tmp`` (one schema, one header)."""

    def __init__(self, tmp: Path, kind: str):
        self.tmp, self.kind, self._parquet, self._csv_started = tmp, kind, None, False

    def write(self, frame: pd.DataFrame) -> None:
        if self.kind == "csv":
            frame.to_csv(self.tmp, mode="a" if self._csv_started else "w", header=not self._csv_started, index=False)
            self._csv_started = True
            return
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._parquet = pq.ParquetWriter(self.tmp, table.schema)
        self._parquet.write_table(table.cast(self._parquet.schema))

    def close(self, columns: list[str]) -> None:
        if self._parquet is not None:
            self._parquet.close()
        elif self.kind == "parquet":  # no rows: an empty file of the columns
            pd.DataFrame({c: [] for c in columns}).to_parquet(self.tmp, index=False)
        elif not self._csv_started:
            pd.DataFrame({c: [] for c in columns}).to_csv(self.tmp, index=False)


@dataclass
class ScoreReport:
    """What :func:`score_file` did: rows scored, rows per adapter (None: the base alone) and, per
    sparse feature, the share of rows whose id the base never saw."""

    rows: int
    per_adapter: dict[str | None, int]
    unseen_share: dict[str, float]


def score_file(
    bank: AdapterBank,
    data: str | Path,
    output: str | Path,
    *,
    fmt: str = "auto",
    roles: Roles | None = None,
    chunk_rows: int = 16384,
    one_adapter: str | None = None,
    progress: bool = True,
) -> ScoreReport:
    """Score every row of ``data`` and write ``output`` (see the module docstring). Each row goes
    through the bank's adapter of its segment (or, with ``one_adapter``, every row through that
    one); ``roles``: how to read a MovieLens or Criteo source's segments."""
    from tqdm.auto import tqdm

    routed = bool(bank.names) and one_adapter is None
    if routed and bank.encoder.schema.segment is None:
        raise ValueError(f"base {bank.base_dir} has no segment column: route rows with --adapter, not --adapters")
    total, schema, chunks = read_chunks(
        data, fmt, scoring_schema(bank.encoder.schema), roles or Roles(), chunk_rows, need_segment=routed
    )
    kind = output_kind(output)
    keep = [c for c in (schema.user, schema.item, schema.segment) if c]
    columns = [ROW, *keep, ADAPTER, SCORE]
    per_adapter: dict[str | None, int] = {}
    oov = {f: n - 1 for f, n in bank.encoder.cardinalities.items()}
    unseen = dict.fromkeys(schema.sparse_features, 0)
    rows = 0
    with atomic_path(output) as tmp, tqdm(total=total, unit="rows", desc="score", disable=not progress) as bar:
        writer = _Writer(tmp, kind)
        for start, frame in chunks:
            encoded = bank.encoder.transform(frame, unseen="oov", name=str(data))
            names = [one_adapter] * len(frame) if one_adapter else frame[schema.segment].tolist() if routed else None
            if names:
                encoded = bank.with_new_ids(frame, encoded, names, name=str(data))
            logits = bank.logits(encoded, names)
            used = [n if n in bank.folders else None for n in names] if names else [None] * len(frame)
            out = {ROW: np.arange(start, start + len(frame), dtype=np.int64)}
            out.update({c: frame[c].to_numpy() for c in keep})
            out.update({ADAPTER: pd.array(used, dtype="string"), SCORE: torch.sigmoid(logits).numpy()})
            writer.write(pd.DataFrame(out, columns=columns))
            for adapter, count in Counter(used).items():
                per_adapter[adapter] = per_adapter.get(adapter, 0) + count
            for feature, ids in encoded.sparse.items():
                unseen[feature] += int((ids == oov[feature]).sum())
            rows += len(frame)
            bar.update(len(frame))
        writer.close(columns)
    return ScoreReport(rows, per_adapter, {f: n / rows if rows else 0.0 for f, n in unseen.items()})
