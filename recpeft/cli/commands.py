"""What each ``recpeft`` sub-command does (the parser lives in cli.py).

pretrain   DATA --output BASE                      train a base click model on every segment (less those left out)
finetune   DATA --base BASE --segment S --output A  a LoRA adapter (or a dense copy) for one segment
finetune   DATA --base BASE --segments A,B|all --output D   one per segment, and a summary
evaluate   DATA --base BASE [--adapter A | --adapters D]   AUC / LogLoss per segment on the rows after the cut
score      DATA --base BASE [--adapter A | --adapters D] --output S.parquet   predictions for new rows
merge      --base BASE --adapter A --output M      fold an adapter into the base: a new base checkpoint
bench      [--base BASE]                           LoRA vs dense fine-tuning cost, side by side
demo                                               the main job on the embedded shop

pretrain, finetune, evaluate and score record the settings they ran with as run.toml (in the output
folder; beside an output file as <file>.run.toml): ``--config`` that file to repeat the run.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError

from recpeft.apps.base_checkpoint import (
    DATA_SOURCE,
    base_fingerprint_files,
    check_base_fingerprint,
    checkpoint_bytes,
    load_base,
    read_data_source,
    save_base,
)
from recpeft.apps.demo_report import figure, print_table, save_report
from recpeft.apps.new_id_rows import (
    NEW_IDS,
    encoded_with,
    lora_with_new_rows,
    merge_new_ids,
    new_id_features,
    new_rows_of,
    read_new_ids,
    segment_new_ids,
)
from recpeft.apps.run_config import RUN_CONFIG, toml_text
from recpeft.apps.target_search import (
    chosen_config,
    ranking_record,
    ranking_table,
    search_targets,
    target_groups,
    within_budget,
)
from recpeft.apps.validation_size import noisy_validation_note, validation_noise
from recpeft.apps.workflow import Method, SegmentRule, click_metrics, finetune, prepare, pretrain
from recpeft.datasets.new_ids import NewIdEncoder
from recpeft.datasets.sources import Roles, load_source, resolve_format
from recpeft.datasets.splits import cut_ns
from recpeft.peft.config import LoraConfig
from recpeft.peft.model import PeftModel
from recpeft.train.trainer import TrainConfig
from recpeft.utils.atomic import atomic_write_text
from recpeft.utils.devices import describe_device
from recpeft.utils.outputs import prepare_output
from recpeft.utils.validation import check_fraction, check_int

from .defaults import FINETUNE, FINETUNE_LR, PRETRAIN, SOURCES
from .main import run_settings, segment_names

#: above this share of ids unknown to the base, finetune/evaluate stop unless --allow-unseen
UNSEEN_LIMIT = 0.5
#: what a failed write says: a full disk or quota, a file-size limit, a read-only or forbidden place
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}
#: the two ways to give the test cut: a base records one, and a flag for either must agree with it
SPLIT_FIELDS = ("test_start", "test_fraction")
#: what a flag that differs from the base's value would do, said when it is refused
CONFLICT_REASONS = {
    "format": "the data would not be read as the base's was",
    "segment_col": "the segments, and each segment's test rows, would not be the base's",
    "segment_by": "the segments, and each segment's test rows, would not be the base's",
    "criteo_segment": "the segments, and each segment's test rows, would not be the base's",
    "test_start": "the base would be scored on rows it trained on",
    "test_fraction": "the base would be scored on rows it trained on",
    "valid_fraction": "the rows held out for early stopping would not be the base's",
    "exclude_segments": "the segments the base never saw would not be the ones it was pretrained without",
    "min_segment_rows": "the segments left out of pretraining would not be the base's",
}
#: folder names under ``finetune --segments``' --output that no segment's folder may take
SUMMARY_FILES = ("summary.json", "summary.png", RUN_CONFIG)
#: the training flags whose defaults (:mod:`.defaults`) a run records as the values it ran with
TRAIN_FIELDS = ("epochs", "batch_size", "lr", "weight_decay", "seed", "stop_metric", "min_improvement", "keep_initial")
#: a --test-start of 9 or more digits (any time from 1973 on) is epoch seconds (or ms, µs, ns by
#: magnitude); shorter numbers stay dates (20250301)
EPOCH_CUT = re.compile(r"\d{9,}(\.\d*)?")


def _roles(args, schema=None) -> Roles:
    """Column roles: a flag the user gave wins, then the base's schema (its encoder.json), then
    the default names. An empty flag ('') unsets a role."""
    flags = {
        "user": args.user,
        "item": args.item,
        "label": args.label,
        "segment": args.segment_col,
        "timestamp": args.timestamp,
    }
    known, defaults = (schema.to_dict() if schema is not None else {}), Roles()
    single = {
        role: (flag if flag is not None else known.get(role, getattr(defaults, role))) or None
        for role, flag in flags.items()
    }
    multi = {
        role: (tuple(c for c in flag.split(",") if c) if flag is not None else tuple(known.get(role, ())))
        for role, flag in (("categorical", args.categorical), ("dense", args.dense))
    }
    return Roles(
        **single,
        **multi,
        segment_by=args.segment_by,
        criteo_segment=args.criteo_segment,
        date_format=args.date_format,
        time_unit=args.time_unit,
    )


def _cut(value):
    """A --test-start as ``split_by_time`` takes it: epoch numbers (:data:`EPOCH_CUT`) as numbers,
    anything else as the time text it is."""
    if isinstance(value, str) and EPOCH_CUT.fullmatch(value.strip()):
        return float(value) if "." in value else int(value)
    return value


def _shown(value) -> str:
    if isinstance(value, list):
        return ",".join(value) or "none"
    return "none" if value is None else str(value)


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _same(field: str, given, recorded) -> bool:
    if field == "test_start":
        return cut_ns(_cut(given), _flag(field)) == cut_ns(_cut(recorded), "the base's test_start")
    return given == recorded


def _given_sources(args) -> dict:
    """The data-source settings the user gave (a format as the path resolves it; '' for no
    segment column as None)."""
    given = {f: getattr(args, f) for f in SOURCES if getattr(args, f) is not None}
    if args.format is not None:
        given["format"] = resolve_format(args.data, args.format)
    if args.segment_col is not None:
        given["segment_col"] = args.segment_col or None
    return given


def _recorded_field(field: str, record: dict) -> str | None:
    """The recorded field a flag for ``field`` must agree with: ``field`` itself, or for a test cut
    the other way of giving it (a base records a start or a fraction); None where there is none."""
    if field in record:
        return field
    return next((f for f in SPLIT_FIELDS if f in record), None) if field in SPLIT_FIELDS else None


def _refuse_conflicts(given: dict, record: dict, where: Path) -> None:
    """Refuse a setting given with another value than the base's record: one line naming the flag,
    both values, the record and what the difference would do."""
    for field, value in given.items():
        recorded = _recorded_field(field, record)
        if recorded is None or (recorded == field and _same(field, value, record[field])):
            continue
        theirs = _shown(record[recorded]) if recorded == field else f"{_flag(recorded)} {_shown(record[recorded])}"
        raise ValueError(
            f"{_flag(field)} {_shown(value)} differs from the base's {theirs} ({where}); "
            f"{CONFLICT_REASONS[field]}. Leave {_flag(field)} out to use the base's"
        )


def _settle_sources(args, base=None) -> None:
    """Fill in, on ``args``, the data-source flags the user left out: the value ``base`` records
    in its data_source.json, else the default; a flag given with another value than the base's
    is refused (:func:`_refuse_conflicts`). A base without a record takes the defaults, as
    before records existed; a base pretrained on the embedded shop reads a given path by its kind."""
    record = {}
    if base is not None:
        with _reading("base checkpoint", base):
            record = read_data_source(base) or {}
    _refuse_conflicts(_given_sources(args), record, Path(str(base)) / DATA_SOURCE)
    if args.format is None:
        recorded = record.get("format", "auto")
        args.format = "auto" if recorded == "shop" and args.data else recorded
    for field, default in SOURCES.items():
        if getattr(args, field) is None:
            setattr(args, field, record.get(field, default))


def _source_record(args, schema) -> dict:
    """The data_source.json record of the data ``args`` (settled) read with ``schema``: the
    format, the segmenting that format uses, the test cut (start or fraction), the validation share."""
    fmt = resolve_format(args.data, args.format)
    segmenting = {"interactions": "segment_col", "movielens": "segment_by", "criteo": "criteo_segment"}.get(fmt)
    values = {"segment_col": schema.segment, "segment_by": args.segment_by, "criteo_segment": args.criteo_segment}
    record = {"format": fmt, **({segmenting: values[segmenting]} if segmenting else {})}
    split = {"test_start": args.test_start} if args.test_start is not None else {"test_fraction": args.test_fraction}
    left_out = {"exclude_segments": list(args.exclude_segments), "min_segment_rows": args.min_segment_rows}
    return {**record, **split, "valid_fraction": args.valid_fraction, **left_out}


def _segmenting(args, schema) -> str:
    """How the data names its segments, in the words of the flag that chose it."""
    fmt = resolve_format(args.data, args.format)
    if fmt == "movielens":
        return f"--segment-by {args.segment_by}"
    if fmt == "criteo":
        return f"--criteo-segment {args.criteo_segment}" if args.criteo_segment else "no --criteo-segment"
    return f"column {schema.segment!r}"


def _segment_rule(args) -> SegmentRule:
    """The segments pretraining leaves out, as the (settled) flags say."""
    check_int("--min-segment-rows", args.min_segment_rows, minimum=0)
    return SegmentRule(tuple(args.exclude_segments), args.min_segment_rows)


def _data(args, base=None, encoder=None, segment: str | None = None):
    """Read, (keep ``segment``'s rows only), split by time and encode, as ``base`` records
    (:func:`_settle_sources`). Without a base's encoder (pretraining), the segments the rule of
    --exclude-segments and --min-segment-rows names are left out, with a printed list; with one,
    refuse data whose ids the base mostly never saw (unless --allow-unseen, :func:`_check_unseen`)."""
    _settle_sources(args, base)
    rule = _segment_rule(args)
    with _reading("data", args.data or "embedded shop"):
        frame, schema = load_source(args.data, args.format, _roles(args, encoder.schema if encoder else None))
    name = str(args.data) if args.data else "embedded shop"
    segmenting = _segmenting(args, schema)
    present = sorted(frame[schema.segment].astype(str).unique()) if schema.segment else []
    unknown = ",".join(sorted(set(rule.exclude) - set(present)))
    if encoder is None and unknown:
        raise ValueError(f"--exclude-segments {unknown}: not in {name}; its segments ({segmenting}) are {present}")
    if segment is not None:
        if segment not in present:
            raise ValueError(f"segment {segment!r} is not in {name}; its segments ({segmenting}) are {present}")
        frame = frame[frame[schema.segment].astype(str) == segment]
    print(
        f"data: {len(frame):,} rows from {name}; features {list(schema.sparse_features)} + dense {list(schema.dense)}; "
        f"segments by {segmenting}"
    )
    with _reading("data", name):
        data = prepare(
            frame,
            schema,
            encoder=encoder,
            test_start=_cut(args.test_start),
            test_fraction=args.test_fraction,
            valid_fraction=args.valid_fraction,
            name=name,
            leave_out=rule if encoder is None else None,
        )
    if data.left_out:
        print("left out of pretraining: " + "; ".join(f"{s} ({why})" for s, why in data.left_out.items()))
    if encoder is not None:
        _check_unseen(data, name, args.allow_unseen, rule.left_out(data.split))
    return data


def _refuse_unseen(shares: dict, judged, where: str, rows: str, question: str, allow: bool) -> None:
    """Refuse where more than :data:`UNSEEN_LIMIT` of ``rows`` (of the data ``where`` names) hold ids
    the base never saw in one of the ``judged`` features (unless ``allow``)."""
    worst = max((f for f in judged if f in shares), key=shares.get, default=None)
    if worst is not None and shares[worst] > UNSEEN_LIMIT and not allow:
        raise ValueError(
            f"{where}: {100 * shares[worst]:.0f}% of {rows}' {worst!r} ids are unknown to the base "
            f"(limit {100 * UNSEEN_LIMIT:.0f}%): {question} Pass --allow-unseen to go on"
        )


def _shares(shares: dict) -> str:
    return ", ".join(f"{f} {100 * v:.1f}%" for f, v in shares.items())


def _check_unseen(data, name: str, allow: bool, left_out: dict[str, str]) -> None:
    """Say which ids the base never saw, and refuse (unless ``allow``) data that looks like
    another data set: over :data:`UNSEEN_LIMIT` of any feature's ids unknown in the segments the
    base was pretrained on; in a segment ``left_out`` of pretraining, whose users (and more) are
    new by design, only over the limit of its items."""
    seen = [s for s in data.segments if s not in left_out]
    for part in ("train", "test") if seen else ():
        shares = data.unseen_share(part, seen if left_out else None)
        if any(shares.values()):
            unseen = _shares({f: v for f, v in shares.items() if v})
            print(f"{part} rows with ids the base never saw (out-of-vocabulary row): {unseen}")
        question = "is this the data the base was pretrained on?"
        _refuse_unseen(shares, list(shares), name, f"the {part} rows", question, allow)
    schema = data.schema
    items = [schema.item] if schema.item else [f for f in schema.sparse_features if f != schema.user]
    for segment in (s for s in data.segments if s in left_out):
        shares = data.unseen_share("test", segment)
        print(
            f"{segment}: left out of pretraining ({left_out[segment]}); share of its test rows with ids the base "
            f"never saw: {_shares(shares) or 'no test rows'} — expected for a segment the base never saw"
        )
        question = "most items unknown looks like another catalogue or schema, not a new market."
        _refuse_unseen(shares, items, name, f"segment {segment!r}'s test rows", question, allow)


def _data_path(args):
    """What the command reads as data: the path given, or the embedded shop's file."""
    if getattr(args, "data", None):
        return args.data
    from recpeft.datasets.synthetic import EMBEDDED_PATH

    return EMBEDDED_PATH


def _reason(exc: BaseException) -> str:
    """The operating system's words for a failed write (a safetensors error wraps them in Rust's
    Debug text: ``IoError(Os { code: 28, ..., message: "No space left on device" })``)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    text = " ".join(str(exc).split())
    found = re.search(r'message: "([^"]*)"', text) or re.search(r"I/O error: (.*?) \(os error \d+\)", text)
    return found.group(1) if found else text


@contextmanager
def _writing(what: str, path):
    """Name ``what`` and ``path`` in any failure to write them (a full disk, a file-size limit);
    a folder the failed write created and left empty is removed."""
    path = Path(path)
    existed = path.exists()
    try:
        yield
    except (OSError, SafetensorError) as exc:
        if isinstance(exc, OSError) and exc.filename and exc.errno not in WRITE_ERRNOS:
            raise  # it names its file: a read, not this write
        if not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise OSError(f"cannot write {what} to {path}: {_reason(exc)}") from exc


@contextmanager
def _reading(what: str, path):
    """Name ``what`` and ``path`` in an error raised while reading them whose message names
    neither (a library's own words, a check that knows the value but not the file)."""
    try:
        yield
    except (ValueError, TypeError, KeyError, IndexError, OSError, RuntimeError, SafetensorError, EOFError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc
        text = " ".join(str(message).split())
        if str(path) in text:
            raise
        if not isinstance(exc, (ValueError, OSError)):
            text = f"{type(exc).__name__}: {text}"
        raise ValueError(f"{what} {path}: {text}") from exc


def _load_base(path):
    with _reading("base checkpoint", path):
        return load_base(path)


def _load_adapter(base, path):
    with _reading("adapter", path):
        return PeftModel.from_pretrained(base, path)


def _adapter_encoder(path, encoder) -> NewIdEncoder | None:
    """The encoder of the adapter in ``path`` where it has new-id rows (its ``new_ids.json``)."""
    with _reading("adapter", path):
        return read_new_ids(path, encoder, LoraConfig.from_pretrained(path))


def _auc(metrics) -> str:
    """An AUC (or a metrics dict's) as text: 4 decimals, or "undefined" where it is NaN."""
    value = metrics["auc"] if isinstance(metrics, dict) else metrics
    return f"{value:.4f}" if isinstance(value, float) and math.isfinite(value) else "undefined"


def _auc_note(*metrics: dict) -> None:
    """Say once why AUC is undefined, where it is."""
    for reason in dict.fromkeys(m["auc_undefined"] for m in metrics if "auc_undefined" in m):
        print(f"AUC undefined: {reason}")


def _finite_or_none(value):
    return value if isinstance(value, float) and math.isfinite(value) else None


def _train_config(args, desc: str, **defaults) -> TrainConfig:
    values = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k, None) is not None}
    return TrainConfig(**{**defaults, **values, "progress": not args.quiet, "desc": desc})


def _settle_training(args, defaults: dict) -> None:
    """Fill in, on ``args``, the training flags left out with ``defaults`` (what runs, and what
    run.toml records); a learning rate with two methods stays per method (None)."""
    for field in TRAIN_FIELDS:
        if getattr(args, field) is None and field in defaults:
            setattr(args, field, defaults[field])


def _run_file(args) -> dict[str, str]:
    """The run's settings (:func:`.main.run_settings`) as ``{run.toml: text}``, for a folder's
    atomic set of files; of the two ways to give the test cut, the one that applied."""
    settings = run_settings(args)
    if "test-start" in settings:
        settings.pop("test-fraction", None)
    return {RUN_CONFIG: toml_text(settings, f"recpeft {args.command}")}


def _beside(path) -> Path:
    """Where a file output's run.toml goes: ``<file>.run.toml`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.name}.{RUN_CONFIG}")


def _prepare_file(args, path, flag: str, reads) -> Path:
    """Check a file output and its run.toml (:func:`_beside`) before any work."""
    for target in (path, _beside(path)):
        prepare_output(target, reads=reads, overwrite=args.overwrite, kind="file", flag=flag)
    return Path(path)


def cmd_pretrain(args) -> None:
    check_int("--embedding-dim", args.embedding_dim)
    _settle_training(args, PRETRAIN)
    out = prepare_output(args.output, reads=[_data_path(args)], overwrite=args.overwrite, flag="--output")
    data = _data(args)
    options = {
        "kind": args.kind,
        "embedding_dim": args.embedding_dim,
        "dense_arch": (32, args.embedding_dim),
        "over_arch": (64, 32),
        "dropout": args.dropout,
    }
    model, report = pretrain(
        data,
        model_options=options,
        train_config=_train_config(args, "pretrain", **PRETRAIN, early_stopping_patience=1),
        device=args.device,
        new_id_share=check_fraction("--new-id-share", args.new_id_share, below_one=True),
    )
    test = click_metrics(model, data.segment_rows("test"))
    scores = report.best_scores or {}
    metrics = {
        "valid_auc": _finite_or_none(scores.get("auc")),
        "valid_logloss": _finite_or_none(scores.get("logloss")),
        "test_auc": _finite_or_none(test["auc"]),
        "device": report.device,
    }
    with _writing("the base checkpoint", out):
        source = _source_record(args, data.schema)
        save_base(out, model, data.encoder, metrics=metrics, data_source=source, extra_files=_run_file(args))
    _auc_note(test)
    print(
        f"pretrained {report.epochs_run} epochs on {report.device} ({report.samples_per_second:,.0f} samples/s): "
        "validation AUC "
        f"{_auc(scores.get('auc'))}, test AUC {_auc(test)}, LogLoss {test['log_loss']:.4f}; saved {out}"
    )


AUTO_TARGETS = "auto"  # --target-modules auto: recpeft.apps.target_search chooses per segment
TARGET_SEARCH = "target_search.json"  # its ranking, in the adapter's folder


def _settle_lora(args, model, schema) -> None:
    """Fill in, on ``args``, the LoRA settings left out: alpha 2r, the model's own targets."""
    if args.lora_alpha is None:
        args.lora_alpha = float(2 * args.r)
    if not args.target_modules:
        args.target_modules = ",".join(model.lora_targets(frozen_features=(schema.user, schema.item)))


def _lora_config(args) -> LoraConfig:
    return LoraConfig(
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=[t for t in args.target_modules.split(",") if t],
    )


def _fit_and_save(args, base, data, segment: str, method: Method, out: Path, extra_files=None) -> dict:
    """Fine-tune a copy of ``base`` on ``segment`` by ``method`` and save it to ``out`` (a LoRA
    adapter with the base's fingerprint, or a dense copy as a base checkpoint with the record),
    with ``extra_files`` in its set: its test metrics, FitReport and size on disk."""
    config = _train_config(args, f"{method.value} {segment}", **FINETUNE, lr=FINETUNE_LR[method.value])
    lora = _lora_config(args) if method is Method.LORA else None
    new, adapted = _new_ids(args, data, segment) if lora is not None and args.new_id_rows else (None, None)
    if lora is not None and args.target_modules == AUTO_TARGETS:
        lora, config, search = _search_targets(args, base, data, segment, lora, config, new, adapted)
        extra_files = {**(extra_files or {}), TARGET_SEARCH: json.dumps(search, indent=1) + "\n"}
    elif new is not None:
        lora = lora_with_new_rows(lora, new_rows_of(new))
    if lora is not None and lora.new_rows:  # the segment's rows as the adapter's new ids see them
        data, extra_files = adapted, {**(extra_files or {}), NEW_IDS: new.to_json()}
    model, report = finetune(base, data, segment, method, train_config=config, lora_config=lora, device=args.device)
    after = click_metrics(model, data.segment_rows("test", segment))
    if method is Method.LORA:
        with _writing("the adapter", out):
            model.save_pretrained(out, extra_files={**base_fingerprint_files(args.base), **(extra_files or {})})
        size = (out / "adapter_model.safetensors").stat().st_size
    else:
        with _writing("the fine-tuned copy", out):
            metrics = {"segment": segment, "test_auc": _finite_or_none(after["auc"])}
            source = _source_record(args, data.schema)
            save_base(out, model, data.encoder, metrics=metrics, data_source=source, extra_files=extra_files)
        size = checkpoint_bytes(out)
    return {"metrics": after, "report": report, "bytes": size, "lora_config": lora, "train_config": config}


def _new_ids(args, data, segment: str):
    """``--new-id-rows``: the segment's new ids (:mod:`recpeft.apps.new_id_rows`) and ``data``
    encoded with them, or (None, None) when its training rows have none."""
    new = segment_new_ids(data, segment, new_id_features(args.new_id_rows, data.encoder))
    counts = ", ".join(f"{f} {new.counts.get(f, 0):,}" for f in new.values)
    print(f"{segment}: new-id rows for the training rows' ids the base never saw: {counts}")
    if not new.counts:
        return None, None
    return new, encoded_with(data, NewIdEncoder(data.encoder, new, name=f"{segment}'s new ids"))


def _search_targets(args, base, data, segment: str, lora: LoraConfig, config: TrainConfig, new=None, adapted=None):
    """``--target-modules auto`` (:mod:`recpeft.apps.target_search`): the chosen LoRA config, the
    training config with the chosen learning rate, and the search as JSON; prints the ranking.
    With new ids (``new``, and ``adapted``: the data encoded with them), their rows are a
    candidate too, probed on the rows as they see them."""
    schema = data.encoder.schema
    groups = target_groups(base, schema.user, schema.item)
    lora = dataclasses.replace(lora, target_modules=[])  # each probe sets its own
    new_rows = new_rows_of(new) if new is not None else None
    share = check_fraction("--max-adapter-share", args.max_adapter_share, below_one=False)
    budget = int(share * checkpoint_bytes(args.base))

    def run_probe(lora_config, train_config):
        quiet = dataclasses.replace(train_config, progress=False)
        rows = adapted if lora_config.new_rows else data
        model, report = finetune(base, rows, segment, Method.LORA, train_config=quiet, lora_config=lora_config,
                                 device=args.device)  # fmt: skip
        return {**(report.best_scores or {}), "bytes": _adapter_bytes(model)}

    best, ranking = search_targets(groups, lora, config, run_probe, new_rows=new_rows, max_bytes=budget)
    print(f"{segment}: --target-modules auto, probes of 1 epoch on the validation rows, best first "
          f"(*: adapter over --max-adapter-share {share:g} of the base, {budget / 1024:.1f} KB):")  # fmt: skip
    print(ranking_table(ranking, budget))
    if not within_budget(best, budget):
        print(f"{segment}: no probe's adapter fits in {budget / 1024:.1f} KB; the best by the metric is kept")
    record = {"segment": segment, **ranking_record(ranking, config.stop_metric, 1, budget)}
    return chosen_config(best, groups, lora, new_rows), dataclasses.replace(config, lr=best.lr), record


def _adapter_bytes(model) -> int:
    """The size of ``model``'s adapter file, as save_pretrained writes it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def _methods(args) -> list[Method]:
    """The --method value as methods; both at once only with --segments; --joint needs LoRA and
    --segments (and a fixed --target-modules: one config serves every segment)."""
    methods = [Method(m) for m in args.method.split(",")]
    if len(methods) > 1 and args.segments is None:
        raise ValueError(f"--method {args.method} trains both side by side: give --segments (one: --segments S)")
    if args.joint and (args.segments is None or Method.LORA not in methods):
        raise ValueError("--joint trains several segments' LoRA adapters together: give --segments and --method lora")
    if args.joint and args.new_id_rows:
        raise ValueError("--joint trains on rows encoded once for every segment: drop --new-id-rows, or --joint")
    if args.new_id_rows and Method.LORA not in methods:
        raise ValueError("--new-id-rows gives a LoRA adapter rows of its own: use it with --method lora")
    if args.joint and args.target_modules == AUTO_TARGETS:
        raise ValueError("--joint trains one LoRA config for every segment: give --target-modules names, not auto")
    return methods


def cmd_finetune(args) -> None:
    methods = _methods(args)
    _settle_training(args, {**FINETUNE, **({"lr": FINETUNE_LR[methods[0].value]} if len(methods) == 1 else {})})
    out = prepare_output(args.output, reads=[args.base, _data_path(args)], overwrite=args.overwrite, flag="--output")
    base, encoder = _load_base(args.base)
    if Method.LORA in methods:
        _settle_lora(args, base, encoder.schema)
    if args.segments is not None:
        return _finetune_segments(args, base, encoder, methods, out)
    method, segment = methods[0], args.segment
    data = _data(args, args.base, encoder, segment=segment)
    done = _fit_and_save(args, base, data, segment, method, out, extra_files=_run_file(args))
    report, after = done["report"], done["metrics"]
    before = click_metrics(base, data.segment_rows("test", segment))
    if method is Method.LORA:
        size = done["bytes"]
        what = f"adapter {size / 1024:.1f} KB ({100 * size / checkpoint_bytes(args.base):.2f}% of the base)"
    else:
        what = "fine-tuned copy of the base"
    _auc_note(before, after)
    kept = "the base (no epoch beat it on validation)" if report.best_epoch == -1 else f"epoch {report.best_epoch}"
    print(
        f"{segment}: {report.epochs_run} epochs on {report.device}, {report.samples_per_second:,.0f} "
        f"samples/s, kept {kept}; test AUC "
        f"base {_auc(before)} → {_auc(after)} (LogLoss {before['log_loss']:.4f} → "
        f"{after['log_loss']:.4f}) on {after['rows']:,} rows; saved the {what} to {out}"
    )
    note = noisy_validation_note(segment, validation_noise(base, data, segment))
    if note:
        print(note)


def _chosen_segments(args, data, name: str) -> list[str]:
    """The segments ``--segments`` names: 'all' is every segment of the data but those
    :class:`SegmentRule` with --min-segment-rows skips (too small, or without train, validation or
    test rows; listed on screen); a list must name segments of the data with training rows."""
    if args.segments.strip() == "all":
        skipped = SegmentRule(min_rows=args.min_segment_rows).left_out(data.split)
        if skipped:
            print("skipping: " + "; ".join(f"{s} ({why})" for s, why in skipped.items()))
        chosen = [s for s in data.segments if s not in skipped]
        if not chosen:
            raise ValueError(f"--segments all: no segment of {name} can be fine-tuned (all skipped, listed above)")
        return chosen
    chosen = segment_names(args.segments)
    unknown = [s for s in chosen if s not in data.segments]
    if unknown or not chosen:
        raise ValueError(
            f"--segments {args.segments}: {unknown or 'none'} not in {name}; its segments are {data.segments}"
        )
    untrainable = [s for s in chosen if "train" in data.split.empty_parts(s)]
    if untrainable:
        raise ValueError(f"--segments: {','.join(untrainable)} of {name} has no training rows before the time cut")
    return chosen


def _segment_folder(segment: str, method: Method) -> str:
    """Where a segment's model goes under --output: ``<segment>`` (LoRA), ``<segment>-dense`` (dense)."""
    return segment if method is Method.LORA else f"{segment}-dense"


def _check_folders(segments: list[str], methods: list[Method]) -> None:
    """Refuse segment names that cannot be folders of their own under --output (a path, a summary
    file's name, or one segment's dense folder being another's adapter folder)."""
    folders = [_segment_folder(s, m) for s in segments for m in methods]
    for folder in folders:
        if folder in ("", ".", "..", *SUMMARY_FILES) or any(c in folder for c in "/\\\x00"):
            raise ValueError(
                f"segment {folder!r} cannot be a folder of its own under --output; fine-tune it with --segment"
            )
    twins = sorted({f for f in folders if folders.count(f) > 1})
    if twins:
        raise ValueError(f"segments {twins} would share a folder under --output (<segment> and <segment>-dense)")


def _finetune_segments(args, base, encoder, methods: list[Method], out: Path) -> None:
    """``finetune --segments``: every chosen segment by every method in one process, a folder per
    model under ``out`` (:func:`_segment_folder`), then the summary (table, summary.json, summary.png)."""
    from tqdm.auto import tqdm

    from recpeft.apps.finetune_summary import segment_row, summarise

    data = _data(args, args.base, encoder)
    name = str(args.data) if args.data else "embedded shop"
    segments = _chosen_segments(args, data, name)
    _check_folders(segments, methods)
    left_out = _segment_rule(args).left_out(data.split)
    rows, configs = [], {}
    joint = _finetune_jointly(args, base, data, segments, out) if args.joint else {}
    bar = tqdm(total=len(segments) * len(methods), desc="segments", unit="model", disable=args.quiet)
    notes = []
    for segment in segments:
        row = segment_row(base, data, segment, left_out.get(segment))
        row.update(validation_noise(base, data, segment))
        notes.append(noisy_validation_note(segment, row))
        for method in methods:
            bar.set_postfix_str(f"{method.value} {segment}")
            folder = _segment_folder(segment, method)
            if method is Method.LORA and joint:
                done = joint[segment]
            else:
                done = _fit_and_save(args, base, data, segment, method, out / folder)
            row.update(_method_fields(method, done, folder))
            configs[method.value] = {"train": done["train_config"].to_dict(), "lora": done["lora_config"]}
            bar.update()
        rows.append(row)
    bar.close()
    for note in filter(None, notes):
        print(note)
    context = {
        "base": str(args.base),
        "data": name,
        "device": describe_device(args.device),
        "methods": [m.value for m in methods],
        "settings": {m: {**c, "lora": c["lora"].to_dict() if c["lora"] else None} for m, c in configs.items()},
        "left_out_of_pretraining": left_out,
        "joint": bool(args.joint),
    }
    with _writing("the summary", out):
        summarise(out, rows, context)
        atomic_write_text(out / RUN_CONFIG, _run_file(args)[RUN_CONFIG])


def _finetune_jointly(args, base, data, segments: list[str], out: Path) -> dict[str, dict]:
    """``--joint``: every segment's adapter in one run (:mod:`recpeft.apps.joint`), each saved to
    ``out/<segment>/``; per segment what :func:`_fit_and_save` returns (the shared run's report,
    with the segment's own kept epoch and validation history)."""
    from recpeft.apps.joint import finetune_jointly

    if "default" in segments:
        raise ValueError("--joint: a segment named 'default' cannot have an adapter folder of its own; drop --joint")
    config = _train_config(args, "joint", **FINETUNE, lr=FINETUNE_LR[Method.LORA.value])
    lora = _lora_config(args)
    model, result = finetune_jointly(base, data, segments, lora_config=lora, train_config=config, device=args.device)
    report, done = result["report"], {}
    for segment in segments:
        model.set_adapter(segment)
        with _writing("the adapter", out / segment):
            model.save_pretrained(out, selected_adapters=[segment], extra_files=base_fingerprint_files(args.base))
        history = [
            {"epoch": h["epoch"], "valid_auc": h[segment]["auc"], "valid_logloss": h[segment]["logloss"]}
            for h in result["history"]
        ]
        own = dataclasses.replace(report, best_epoch=result["best_epoch"][segment], history=history)
        done[segment] = {
            "metrics": click_metrics(model, data.segment_rows("test", segment)),
            "report": own,
            "bytes": (out / segment / "adapter_model.safetensors").stat().st_size,
            "lora_config": lora,
            "train_config": config,
        }
    print(
        f"joint: {len(segments)} adapters in one run of {report.epochs_run} epochs, {report.seconds:.1f} s; "
        "kept epochs " + ", ".join(f"{s} {result['best_epoch'][s]}" for s in segments)
    )
    return done


def _method_fields(method: Method, done: dict, folder: str) -> dict:
    """A summary row's fields for one method's run (prefixed ``lora_`` or ``dense_``)."""
    report, metrics = done["report"], done["metrics"]
    fields = {
        "auc": metrics["auc"],
        "log_loss": metrics["log_loss"],
        "epochs": report.epochs_run,
        "best_epoch": report.best_epoch,
        "seconds": report.seconds,
        "samples_per_second": report.samples_per_second,
        "bytes": done["bytes"],
        "folder": folder,
        "history": report.history,
    }
    return {f"{method.value}_{k}": v for k, v in fields.items()}


def cmd_evaluate(args) -> None:
    if args.json:
        reads = [args.base, args.adapter, args.adapters, _data_path(args)]
        _prepare_file(args, args.json, "--json", reads)
    if args.adapters:
        return _evaluate_routed(args)
    base, encoder = _load_base(args.base)
    data = _data(args, args.base, encoder, segment=args.segment)
    model = base
    if args.adapter:
        check_base_fingerprint(args.adapter, args.base, args.ignore_base_mismatch)
        model = _load_adapter(base, args.adapter)
        own = _adapter_encoder(args.adapter, encoder)
        data = data if own is None else encoded_with(data, own)
    model = model.to(args.device).eval()
    segments = [args.segment] if args.segment else data.segments
    rows = []
    print(f"{'segment':<16}{'rows':>9}{'click rate':>11}{'AUC':>8}{'LogLoss':>9}")
    for segment in segments:
        metrics = click_metrics(model, data.segment_rows(args.part, segment), part=args.part)
        rows.append({"segment": segment, **metrics})
        print(
            f"{segment:<16}{metrics['rows']:>9,}{metrics['click_rate']:>11.3f}{_auc(metrics):>8}"
            f"{metrics['log_loss']:>9.4f}"
        )
    for row in rows:
        if "auc_undefined" in row:
            print(f"{row['segment']}: AUC undefined: {row['auc_undefined']}")
    if args.json:
        report = {"base": str(args.base), "adapter": args.adapter, "part": args.part, "segments": rows}
        _write_report(args, report)


def _write_report(args, report: dict) -> None:
    """``report`` (with the device and the run's settings) as --json, and its run.toml beside it."""
    report = {**report, "device": describe_device(args.device), "settings": run_settings(args)}
    with _writing("the JSON report", args.json):
        save_report(args.json, report)
        atomic_write_text(_beside(args.json), _run_file(args)[RUN_CONFIG])
    print(f"wrote {args.json} and {_beside(args.json)}")


def _bank(args):
    """The base and the adapters --adapters (every segment's) or --adapter (one, named by its
    folder) name, in one AdapterBank; any adapter that does not fit the base is refused, naming it."""
    from recpeft.apps.adapter_bank import AdapterBank
    from recpeft.apps.scoring import find_adapter_folders

    with _reading("base checkpoint", args.base):
        bank = AdapterBank(args.base, device=args.device, chunk_rows=getattr(args, "chunk_rows", 8192))
    if args.adapters:
        folders = find_adapter_folders(args.adapters)
        lora, dense = folders.lora, folders.dense
    else:
        lora, dense = ({Path(args.adapter).name: Path(args.adapter)} if args.adapter else {}), {}
    refused = bank.add_folders(lora, ignore_base_mismatch=args.ignore_base_mismatch)
    if refused:  # each reason names the adapter, its folder and why (another base: the flag that allows it)
        raise ValueError(next(iter(refused.values())))
    if dense:
        print(
            f"dense copies (base checkpoints, not adapters; not routed): {', '.join(sorted(dense))}; score one "
            f"with --base {Path(args.adapters) / '<segment>-dense'}"
        )
    return bank


#: evaluate --adapters' table: (header, width, row → text)
ROUTED_COLUMNS = [
    ("segment", 10, lambda r: r["segment"]),
    ("rows", 6, lambda r: figure(r.get("rows"), ",")),
    ("click rate", 10, lambda r: figure(r.get("click_rate"), ".3f")),
    ("base AUC", 8, lambda r: figure(r["base_auc"], ".4f")),
    ("adapted AUC", 11, lambda r: figure(r["adapted_auc"], ".4f")),
    ("base LogLoss", 12, lambda r: figure(r["base_log_loss"], ".4f")),
    ("adapted LogLoss", 15, lambda r: figure(r["adapted_log_loss"], ".4f")),
    ("adapter", 8, lambda r: r.get("adapter") or ("—" if r["segment"].startswith("(") else "base*")),
]
ROUTED_LEGEND = (
    "adapted: each segment through its own adapter, one routed pass; base*: no adapter for the segment, the "
    "base's scores; (weighted): the mean over segments weighted by their rows."
)


def _evaluate_routed(args) -> None:
    """``evaluate --adapters DIR``: every segment through its own adapter (:mod:`recpeft.apps.scoring`)."""
    from recpeft.apps.finetune_summary import weighted_row
    from recpeft.apps.scoring import routed_evaluation

    bank = _bank(args)
    data = _data(args, args.base, bank.encoder, segment=args.segment)
    segments = [args.segment] if args.segment else data.segments
    rows = routed_evaluation(bank, data, args.part, segments)
    weighted = weighted_row(rows, ["base", "adapted"], count="rows")
    print(f"{len(bank.names)} adapters from {args.adapters} on the {args.part} rows")
    print_table([*rows, weighted], ROUTED_COLUMNS, ROUTED_LEGEND)
    for row in rows:
        if "auc_undefined" in row:
            print(f"{row['segment']}: AUC undefined: {row['auc_undefined']}")
    if args.json:
        report = {
            "base": str(args.base),
            "adapters": str(args.adapters),
            "part": args.part,
            "routing": {segment: str(folder) for segment, folder in bank.folders.items()},
            "segments": rows,
            "impression_weighted": weighted,
        }
        _write_report(args, report)


def cmd_score(args) -> None:
    from recpeft.apps.scoring import output_kind, score_file

    check_int("--chunk-rows", args.chunk_rows)
    if args.data is None:
        raise ValueError("give the DATA to score (or `data` in --config)")
    output_kind(args.output)
    reads = [args.data, args.base, args.adapter, args.adapters]
    out = _prepare_file(args, args.output, "--output", reads)
    with _reading("base checkpoint", args.base):
        record = read_data_source(args.base) or {}
    if args.format is None:
        recorded = record.get("format", "auto")
        args.format = "auto" if recorded == "shop" else recorded
    bank = _bank(args)
    roles = Roles(
        segment_by=record.get("segment_by", SOURCES["segment_by"]), criteo_segment=record.get("criteo_segment")
    )
    with _writing("the scores", out):
        report = score_file(
            bank,
            args.data,
            out,
            fmt=args.format,
            roles=roles,
            chunk_rows=args.chunk_rows,
            one_adapter=Path(args.adapter).name if args.adapter else None,
            progress=not args.quiet,
        )
        atomic_write_text(_beside(out), _run_file(args)[RUN_CONFIG])
    unseen = {f: v for f, v in report.unseen_share.items() if v}
    if unseen:
        print(f"rows with ids the base never saw (out-of-vocabulary row): {_shares(unseen)}")
    counts = sorted(report.per_adapter.items(), key=lambda item: (item[0] is not None, str(item[0])))  # base first
    used = "; ".join(f"{name or 'base'} {count:,}" for name, count in counts)
    print(f"scored {report.rows:,} rows of {args.data} (rows per adapter: {used or 'none'})")
    print(f"wrote {out} and {_beside(out)}")


def cmd_merge(args) -> None:
    out = prepare_output(args.output, reads=[args.base, args.adapter], overwrite=args.overwrite, flag="--output")
    base, encoder = _load_base(args.base)
    check_base_fingerprint(args.adapter, args.base, args.ignore_base_mismatch)
    own = _adapter_encoder(args.adapter, encoder)
    merged = _load_adapter(base, args.adapter).merge_and_unload()
    metrics = {"merged_adapter": str(args.adapter)}
    if own is not None:  # the new ids join the vocabulary; the new-id row stays last
        merged, encoder = merge_new_ids(merged, own)
        metrics["new_ids"] = own.new_ids.counts
    with _reading("base checkpoint", args.base):
        source = read_data_source(args.base)
    with _writing("the merged base checkpoint", out):
        save_base(out, merged, encoder, metrics=metrics, data_source=source)
    print(f"merged {args.adapter} into {args.base}; saved {args.output} (a base checkpoint: use it with --base)")


def cmd_bench(args) -> None:
    from recpeft.apps.bench import print_bench, run_bench

    if args.json:
        prepare_output(args.json, reads=[args.base], overwrite=args.overwrite, kind="file", flag="--json")
    result = run_bench(base=args.base, progress=not args.quiet, device=args.device)
    print_bench(result)
    if args.json:
        with _writing("the JSON report", args.json):
            save_report(args.json, result)
        print(f"wrote {args.json}")


def cmd_demo(args) -> None:
    from recpeft.apps.demo import run_demo

    out = prepare_output(args.output, reads=[_data_path(args)], overwrite=args.overwrite, flag="--output")
    with _writing("the demo's outputs", out):
        run_demo(
            out, seed=args.seed, progress=not args.quiet, fresh=args.fresh, markets=args.markets, device=args.device
        )


def cmd_serve(args) -> None:
    import dataclasses

    from recpeft.serve import ServeLimits, run_server

    check_int("--port", args.port, minimum=0)
    fields = [f.name for f in dataclasses.fields(ServeLimits)]
    try:
        limits = ServeLimits(**{f: getattr(args, f) for f in fields})
    except ValueError as exc:  # name the flag, not the field
        text = str(exc)
        for f in fields:
            text = text.replace(f"ServeLimits.{f}", f"--{f.replace('_', '-')}")
        raise ValueError(text) from None
    run_server(
        args.base,
        args.adapters,
        args.host,
        args.port,
        limits=limits,
        device=args.device,
        ignore_base_mismatch=args.ignore_base_mismatch,
        log_level="warning" if args.quiet else "info",
    )
