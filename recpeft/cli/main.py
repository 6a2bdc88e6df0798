"""The ``recpeft`` command: argument parsing and one-line errors (the work is in
:mod:`.commands`, imported only once a subcommand runs, so ``--help`` imports no torch).

Settings may also come from a TOML file, ``--config run.toml`` (:func:`parse_args`): a key per
flag of the subcommand (``batch-size``, ``batch_size`` or an alias such as ``out``), each value
typed as the flag takes it; a flag given on the command line wins over the file. Every command
with an output records the settings it ran with (:func:`run_settings`) as ``run.toml`` there.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import datetime
import importlib.metadata
import importlib.util
import io
import logging
import sys
from pathlib import Path

from recpeft.datasets.formats import FORMATS, MOVIELENS_SEGMENT_ATTRIBUTES, TIME_UNITS

from .defaults import CHUNK_ROWS, FINETUNE, FINETUNE_LR, METHODS, PRETRAIN, SOURCES, STOP_METRICS

EXAMPLES = """examples:
  recpeft demo                                            # the main job on the embedded shop
  recpeft pretrain log.parquet --segment-col country --categorical category,brand --dense price --output base
  recpeft finetune log.parquet --base base --segments all --method lora,dense --output adapters   # + summary
  recpeft evaluate log.parquet --base base --adapters adapters     # every segment through its own adapter
  recpeft score new.parquet --base base --adapters adapters --output scores.parquet
  recpeft finetune log.parquet --base base --segment DE --output adapters/DE
  recpeft merge --base base --adapter adapters/DE --output base-DE
  recpeft pretrain --config base/run.toml --output base-again    # repeat a run from its settings
  recpeft bench
"""
#: the subcommands that read --config (and write run.toml beside their output)
CONFIG_COMMANDS = ("pretrain", "finetune", "evaluate", "score")
#: what a run.toml does not record: how a run is shown and where its settings came from
NOT_RECORDED = ("config", "overwrite", "debug", "quiet")
#: torch.fx logs this once per process the first time a torchrec KeyedJaggedTensor is built
#: (its class is an fx ProxyableClassMeta, whose constructor asks ``is_fx_tracing``): a note for
#: torch.export authors that lands inside the first table or progress bar
FX_TRACING_NOTE = ("torch.fx._symbolic_trace", "is_fx_tracing will return true")


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, but an option with aliases shows its value once: ``--output OUTPUT
    (alias: --out)`` instead of ``--output OUTPUT, --out OUTPUT``."""

    def _format_action_invocation(self, action):
        if len(action.option_strings) < 2 or action.nargs == 0 or action.option_strings[0] in ("-h",):
            return super()._format_action_invocation(action)
        value = self._format_args(action, self._get_default_metavar_for_optional(action))
        first, *aliases = action.option_strings
        return f"{first} {value} (alias: {', '.join(aliases)})"


class RawDescriptionHelpFormatter(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    """:class:`HelpFormatter` keeping the description's line breaks (the demo's docstring)."""


def _module_docstring(module: str) -> str | None:
    """The docstring of ``module``, read from its source without importing it (the demo's
    module imports torch; its docstring is the ``demo`` subcommand's description)."""
    spec = importlib.util.find_spec(module)
    return ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) if spec and spec.origin else None


def _version() -> str:
    """The installed package's version (read from its metadata: no import of recpeft's modules)."""
    try:
        return importlib.metadata.version("recpeft")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def segment_names(text: str) -> list[str]:
    """A comma-separated list of segment names, as a sorted list without repeats or blanks."""
    return sorted({name.strip() for name in text.split(",") if name.strip()})


def _data_arguments(parser: argparse.ArgumentParser, *, reads_base: bool) -> None:
    """The data flags. Where the command reads a base (``reads_base``), the format, segmenting and
    split flags default to what the base recorded (its data_source.json), and a different value is
    refused; their parser defaults are None so that a flag left out can be told apart."""
    prefix = "the base's, else " if reads_base else ""
    default = lambda value: f"default: {prefix}{value}"  # noqa: E731
    per_segment = default("each segment's latest --test-fraction")
    data = parser.add_argument_group("data", "what to read and how to split it by time")
    data.add_argument(
        "data",
        nargs="?",
        default=None,
        help="interaction log (CSV/Parquet), MovieLens folder, or Criteo TSV; omit it to use the embedded shop",
    )
    data.add_argument("--format", choices=FORMATS, default=None, help=f"data format ({default('from the path')})")
    data.add_argument("--user", default=None, help="user id column ('' for none; default: the base's, else 'user')")
    data.add_argument("--item", default=None, help="item id column ('' for none; default: the base's, else 'item')")
    data.add_argument("--label", default=None, help=f"0/1 label column ({default(repr('label'))})")
    data.add_argument(
        "--segment-col",
        default=None,
        help=f"column naming each row's segment (market, ...; '' for none; {default(repr('segment'))})",
    )
    data.add_argument(
        "--timestamp", default=None, help=f"time column (datetimes or epoch numbers; {default(repr('timestamp'))})"
    )
    data.add_argument(
        "--date-format",
        default=None,
        help="strftime pattern of a text time column, e.g. '%%d/%%m/%%Y %%H:%%M' (needed when the data "
        "cannot prove day/month order; default: ISO 8601 and other unambiguous forms)",
    )
    data.add_argument(
        "--time-unit",
        choices=TIME_UNITS,
        default=None,
        help="unit of an epoch-number time column (default: detected from the magnitude)",
    )
    data.add_argument(
        "--categorical", default=None, help=f"comma-separated extra id/string feature columns ({default('none')})"
    )
    data.add_argument("--dense", default=None, help=f"comma-separated numeric feature columns ({default('none')})")
    data.add_argument(
        "--segment-by",
        default=None,
        choices=MOVIELENS_SEGMENT_ATTRIBUTES,
        help=f"MovieLens: the user attribute that names segments ({default(SOURCES['segment_by'])})",
    )
    data.add_argument(
        "--criteo-segment",
        default=None,
        help=f"Criteo: a C column (C1..C26) naming segments ({default('none')})",
    )
    data.add_argument(
        "--test-start",
        default=None,
        help="rows from this time on are test rows: a date or time (2025-03-01, 2025-03-01T12:00) or "
        f"epoch seconds (1740787200) ({per_segment})",
    )
    data.add_argument(
        "--test-fraction",
        type=float,
        default=None,
        help="each segment's latest share of rows for test, without --test-start "
        f"({default(SOURCES['test_fraction'])})",
    )
    data.add_argument(
        "--allow-unseen",
        action="store_true",
        help="fine-tune/evaluate even when over half of a feature's ids are unknown to the base (for a "
        "segment left out of pretraining: of its items)",
    )
    data.add_argument(
        "--valid-fraction",
        type=float,
        default=None,
        help="each segment's latest share of rows before the test cut, for early stopping "
        f"({default(SOURCES['valid_fraction'])})",
    )
    data.add_argument(
        "--exclude-segments",
        type=segment_names,
        default=None,
        metavar="A,B",
        help="segments left out of pretraining (a market the base never sees), kept in the data for "
        f"finetune and evaluate ({default('none')})",
    )
    data.add_argument(
        "--min-segment-rows",
        type=int,
        default=None,
        metavar="N",
        help="segments with fewer rows, or without train/validation/test rows, are left out of pretraining "
        f"(and skipped by finetune --segments all) ({default(SOURCES['min_segment_rows'])})",
    )


def _train_arguments(parser: argparse.ArgumentParser, defaults: dict, lr: str) -> None:
    """The training flags; ``defaults`` (from :mod:`.defaults`) and ``lr`` say their defaults."""
    train = parser.add_argument_group("training")
    train.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"maximum epochs (early stopping may end sooner; default: {defaults['epochs']})",
    )
    train.add_argument(
        "--batch-size", type=int, default=None, help=f"rows per step (default: {defaults['batch_size']})"
    )
    train.add_argument(
        "--lr", type=float, default=None, help=f"peak learning rate (warmup, then cosine; default: {lr})"
    )
    train.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help=f"AdamW's decoupled weight decay (default: {defaults['weight_decay']})",
    )
    train.add_argument(
        "--seed", type=int, default=None, help=f"seeds initialisation and row order (default: {defaults['seed']})"
    )
    train.add_argument(
        "--stop-metric",
        choices=STOP_METRICS,
        default=None,
        help="validation metric for early stopping and the kept epoch; both are reported "
        f"(default: {defaults['stop_metric']})",
    )
    train.add_argument(
        "--min-improvement",
        type=float,
        default=None,
        metavar="DELTA",
        help="an epoch counts as better only when it beats the best validation metric by more than this "
        f"(default: {defaults['min_improvement']})",
    )
    train.add_argument(
        "--keep-initial",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the starting weights compete as epoch -1: kept when no epoch beats them on validation "
        f"(default: {defaults['keep_initial']})",
    )


def _output_argument(parser: argparse.ArgumentParser, help: str, *, required: bool = True, default=None) -> None:
    """``--output`` (alias ``--out``, the spelling of earlier releases)."""
    parser.add_argument("--output", "--out", dest="output", required=required, default=default, help=help)


def _config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        metavar="RUN.toml",
        help="read settings from this TOML file: a key per flag (batch-size = 512), typed as the flag; a flag "
        "on the command line wins. Each run writes its own as run.toml with its output, to repeat it exactly",
    )


def _overwrite_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace {what}; without it an existing output is refused. An output inside (or holding) "
        "what the command reads is refused either way",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recpeft",
        formatter_class=RawDescriptionHelpFormatter,
        epilog=EXAMPLES,
        description="Parameter-efficient fine-tuning (LoRA) of recommendation models: pretrain one base click "
        "model on every segment, then a small adapter per segment (market, category, cohort).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    common.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads for torch (default 1: these small models run fastest on one, and "
        "several fight over a busy machine)",
    )
    common.add_argument(
        "--device",
        default="auto",
        help="where models train and score: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or "
        "cuda:N (default: auto)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add = lambda name, **kw: sub.add_parser(name, parents=[common], **{"formatter_class": HelpFormatter, **kw})  # noqa: E731

    demo = add(
        "demo",
        help="the main job on the embedded synthetic shop, with a report",
        description=_module_docstring("recpeft.apps.demo"),
        formatter_class=RawDescriptionHelpFormatter,
    )
    _output_argument(
        demo,
        "folder for the base, adapters, report.json and report.png (default: runs/demo)",
        required=False,
        default="runs/demo",
    )
    demo.add_argument("--seed", type=int, default=0, help="seeds every model and row order (default: 0)")
    demo.add_argument("--fresh", action="store_true", help="pretrain the base again even if --output holds one")
    _overwrite_argument(demo, "a previous run in --output (its saved base is reused unless --fresh)")
    demo.add_argument(
        "--markets", nargs="+", default=None, help="markets to personalise (default: all but the largest)"
    )
    demo.set_defaults(run="cmd_demo")

    pre = add(
        "pretrain",
        help="train a base click model (torchrec DLRM/DCN) on every segment",
        description="Train a base click model on every segment's rows before the time cut "
        "(early-stopped on the latest of them) and save it with its encoder.",
    )
    _data_arguments(pre, reads_base=False)
    _train_arguments(pre, PRETRAIN, lr=str(PRETRAIN["lr"]))
    _output_argument(pre, "folder for the base checkpoint (and its run.toml)")
    _config_argument(pre)
    _overwrite_argument(pre, "an existing --output folder")
    pre.add_argument(
        "--kind", choices=("dlrm", "dcn"), default="dlrm", help="DLRM or DLRM with a DCN interaction (default: dlrm)"
    )
    pre.add_argument("--embedding-dim", type=int, default=64, help="width of every embedding table (default: 64)")
    pre.add_argument(
        "--new-id-share",
        type=float,
        default=0.0,
        help="share of training ids fed as each table's new-id (out-of-vocabulary) row, so it learns what "
        "a customer or product the base never saw looks like; e.g. 0.02 (default: 0.0)",
    )
    pre.add_argument("--dropout", type=float, default=0.0, help="dropout in the MLPs (default: 0.0)")
    pre.set_defaults(run="cmd_pretrain")

    fine = add(
        "finetune",
        help="train a LoRA adapter (or a dense copy) for one segment, or for several with a summary",
        description="Fine-tune the base on one segment's rows before the time cut and report "
        "base vs fine-tuned AUC on the segment's rows after it; with --segments, every listed segment "
        "in one run, with a summary. The data is encoded "
        "with the base's vocabularies (unseen ids use the out-of-vocabulary row).",
    )
    _data_arguments(fine, reads_base=True)
    _train_arguments(fine, FINETUNE, lr=" with LoRA, ".join(map(str, FINETUNE_LR.values())) + " dense")
    fine.add_argument("--base", required=True, help="base checkpoint folder (from `recpeft pretrain`)")
    which = fine.add_mutually_exclusive_group(required=True)
    which.add_argument("--segment", default=None, help="the segment to fine-tune on")
    which.add_argument(
        "--segments",
        default=None,
        metavar="A,B|all",
        help="several segments in one run ('all': every one with enough rows, see --min-segment-rows): "
        "--output/<segment>/ per LoRA adapter, --output/<segment>-dense/ per dense copy, and a summary "
        "(summary.json, summary.png)",
    )
    fine.add_argument(
        "--joint",
        action="store_true",
        help="with --segments: train every segment's LoRA adapter in one pass over their mixed rows, each row "
        "routed to its own segment's adapter, with early stopping per segment (dense copies still train one by one)",
    )
    _output_argument(
        fine,
        "folder for the adapter (or, with --method dense, the copy; with --segments, for all of them) and run.toml",
    )
    _config_argument(fine)
    fine.add_argument(
        "--method",
        choices=METHODS,
        default="lora",
        help="a LoRA adapter, dense fine-tuning of a copy of the whole base, or (with --segments) both (default: lora)",
    )
    _overwrite_argument(fine, "an existing --output folder")
    fine.add_argument("--r", type=int, default=4, help="LoRA rank (default: 4)")
    fine.add_argument(
        "--lora-alpha", "--alpha", dest="lora_alpha", type=float, default=None, help="LoRA alpha (default: 2r)"
    )
    fine.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default: 0.0)")
    fine.add_argument(
        "--target-modules",
        "--targets",
        dest="target_modules",
        default=None,
        metavar="NAMES",
        help="comma-separated module names to adapt, or auto: choose the targets, rank and learning rate "
        "on the segment's validation rows by short probes (about 2x one fine-tune; the ranking is printed "
        "and saved as target_search.json) (default: the model's own choice: attribute tables and every MLP layer)",
    )
    fine.add_argument(
        "--max-adapter-share",
        type=float,
        default=0.02,
        metavar="FRACTION",
        help="with --target-modules auto: a probe whose adapter file is larger than this share of the base "
        "checkpoint ranks after every probe within it (default: 0.02)",
    )
    fine.add_argument(
        "--new-id-rows",
        default=None,
        metavar="FEATURES",
        help="comma-separated id features (such as the user column): each value of the segment's training rows "
        "the base never saw gets a LoRA row of the adapter's own, starting as the base's new-id row (pretrain "
        "with --new-id-share to teach that row); the tables are added to the targets (with auto: one more "
        "candidate, kept if it wins on validation) and the values saved as new_ids.json, which evaluate, "
        "score, serve and merge use (LoRA only; default: none)",
    )
    fine.set_defaults(run="cmd_finetune")

    ev = add(
        "evaluate",
        help="AUC and LogLoss per segment of a base, with an adapter or every segment's own",
        description="Score a base on each segment's rows after the time cut; with --adapter, the base with that "
        "adapter; with --adapters, every segment through its own adapter in one routed pass, beside the base, "
        "with the impression-weighted row.",
    )
    _data_arguments(ev, reads_base=True)
    ev.add_argument("--base", required=True, help="base checkpoint folder (from `recpeft pretrain` or `merge`)")
    ev.add_argument(
        "--ignore-base-mismatch",
        action="store_true",
        help="apply --adapter(s) even if trained on another base",
    )
    adapters = ev.add_mutually_exclusive_group()
    adapters.add_argument(
        "--adapter", default=None, help="adapter folder to apply to the base (default: none, the base alone)"
    )
    adapters.add_argument(
        "--adapters",
        default=None,
        metavar="DIR",
        help="folder of adapter folders, DIR/<segment>/ (as finetune --segments writes): each segment through "
        "its own, the others through the base; DIR/<segment>-dense/ copies are base checkpoints, not used here",
    )
    ev.add_argument("--segment", default=None, help="only this segment (default: every segment)")
    ev.add_argument(
        "--part", choices=("train", "valid", "test"), default="test", help="which rows to score (default: test)"
    )
    ev.add_argument(
        "--json", default=None, help="also write the table as JSON here (and the run's settings as <json>.run.toml)"
    )
    _config_argument(ev)
    _overwrite_argument(ev, "an existing --json file")
    ev.set_defaults(run="cmd_evaluate")

    score = add(
        "score",
        help="click probabilities for new rows, each through its segment's adapter",
        description="Score the rows of DATA (no label needed) with a base, routing each row to the adapter of "
        "its segment (--adapters) or one adapter (--adapter), in chunks; write row, id and segment columns, the "
        "adapter used and the score to --output (.parquet or .csv), and the settings to <output>.run.toml.",
    )
    score.add_argument(
        "data", nargs="?", default=None, help="rows to score: CSV/Parquet (streamed), a MovieLens folder or Criteo TSV"
    )
    score.add_argument(
        "--format", choices=FORMATS, default=None, help="data format (default: the base's, else from the path)"
    )
    score.add_argument("--base", required=True, help="base checkpoint folder")
    routes = score.add_mutually_exclusive_group()
    routes.add_argument("--adapter", default=None, help="one adapter folder for every row (default: none)")
    routes.add_argument(
        "--adapters",
        default=None,
        metavar="DIR",
        help="folder of adapter folders, DIR/<segment>/: each row through its segment's, rows of other segments "
        "through the base (default: none, the base alone)",
    )
    score.add_argument(
        "--ignore-base-mismatch", action="store_true", help="apply adapters even if trained on another base"
    )
    _output_argument(score, "the scores file: .parquet (or .pq) or .csv, by its suffix")
    score.add_argument(
        "--chunk-rows",
        type=int,
        default=CHUNK_ROWS,
        help=f"rows read and scored at a time (default: {CHUNK_ROWS})",
    )
    _config_argument(score)
    _overwrite_argument(score, "an existing --output file")
    score.set_defaults(run="cmd_score")

    merge = add("merge", help="fold an adapter into the base weights; writes a new base checkpoint")
    merge.add_argument("--base", required=True, help="base checkpoint folder the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="adapter folder (from `recpeft finetune`)")
    _output_argument(merge, "folder for the merged base checkpoint")
    _overwrite_argument(merge, "an existing --output folder")
    merge.add_argument(
        "--ignore-base-mismatch", action="store_true", help="merge even if the adapter was trained on another base"
    )
    merge.set_defaults(run="cmd_merge")

    bench = add(
        "bench",
        help="LoRA vs dense fine-tuning: samples/s and peak memory, side by side",
        description="Measure one LoRA fine-tuning step against dense fine-tuning with Adam on "
        "the same model and batches, in one run: samples/s (interleaved rounds) "
        "and peak memory (each variant in a fresh process).",
    )
    bench.add_argument(
        "--base",
        default=None,
        help="measure this base checkpoint (default: the demo's architecture with production-size tables)",
    )
    bench.add_argument("--json", default=None, help="write the figures as JSON here")
    _overwrite_argument(bench, "an existing --json file")
    bench.set_defaults(run="cmd_bench")

    from recpeft.serve.limits import ServeLimits  # plain constants (no torch): the bounds' defaults

    serve = add(
        "serve",
        help="an HTTP scoring server (FastAPI + uvicorn): each row through its segment's adapter",
        description="Serve a base and every adapter under --adapters over HTTP until stopped (Ctrl-C): POST /score "
        '{"rows": [...]} (concurrent requests micro-batched), GET /health, GET/POST /adapters, DELETE '
        "/adapters/NAME (see recpeft.serve.app). An adapter folder that does not fit the base is listed and left out.",
    )
    serve.add_argument("--base", required=True, help="base checkpoint folder")
    serve.add_argument(
        "--adapters", default=None, metavar="DIR", help="folder of adapter folders, DIR/<segment>/ (default: none)"
    )
    serve.add_argument(
        "--ignore-base-mismatch", action="store_true", help="serve adapters even if trained on another base"
    )
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    limits = ServeLimits()
    for field, kind, help in [
        ("max_rows", int, "rows one request may carry"),
        ("max_body_bytes", int, "bytes of one request body"),
        ("batch_rows", int, "rows one micro-batch gathers at most"),
        ("batch_wait_ms", float, "ms the first request of a batch waits for others"),
        ("max_pending", int, "requests queued at most (more: 503)"),
        ("timeout_s", float, "seconds a request waits for its scores (then 503)"),
    ]:
        default = getattr(limits, field)
        flag = f"--{field.replace('_', '-')}"
        serve.add_argument(flag, type=kind, default=default, help=f"{help} (default: {default})")
    serve.set_defaults(run="cmd_serve")
    return parser


#: errors whose message is the whole story (they name the file, column or field); any other type
#: is named in front of its message
PLAIN_ERRORS = (ValueError, KeyError, OSError)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: its message with the lines joined, a KeyError's key unquoted, the type
    named where the message alone would not say what failed (``MemoryError``, a library's own
    error), and a hint at ``--debug`` for errors no recpeft check raised."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    message = exc.args[0] if isinstance(exc, KeyError) and len(exc.args) == 1 else exc
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    if isinstance(exc, MemoryError):
        return f"out of memory{': ' + text if text else ''}"
    if isinstance(exc, PLAIN_ERRORS) and text:
        return text
    text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return f"{text} (run again with --debug for the traceback)"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@contextlib.contextmanager
def _relaxed(parser: argparse.ArgumentParser, dests=None):
    """``parser`` with its required options (and required groups) of ``dests`` (None: all)
    optional, restored afterwards: what a config file gives need not be on the command line."""
    actions = [(a, a.required) for a in parser._actions if dests is None or a.dest in dests]
    groups = [
        (g, g.required)
        for g in parser._mutually_exclusive_groups
        if dests is None or any(a.dest in dests for a in g._group_actions)
    ]
    try:
        for item, _ in actions + groups:
            item.required = False
        yield parser
    finally:
        for item, required in actions + groups:
            item.required = required


def _config_keys(sub: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Key (underscores for dashes) → action, for every flag a config file may set: each long
    option string (aliases too) and each dest."""
    keys = {}
    for action in sub._actions:
        if action.dest in ("help", "config") or isinstance(action, argparse._VersionAction):
            continue
        for name in (action.dest, *(o.lstrip("-") for o in action.option_strings if o.startswith("--"))):
            keys[name.replace("-", "_")] = action
    return keys


def _typed(action: argparse.Action, value, where: str):
    """A config ``value`` as the flag of ``action`` takes it (see :func:`config_values`)."""
    if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
        if not isinstance(value, bool):
            raise ValueError(f"{where} = {value!r}: a switch takes true or false")
        return value
    if isinstance(value, (bool, dict)):
        kind = "switch" if isinstance(value, bool) else "table"
        raise ValueError(f"{where} = {value!r}: the flag takes a value, not a {kind}")
    if isinstance(value, list):
        if not all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            raise ValueError(f"{where} = {value!r}: a list must hold names")
        value = ",".join(map(str, value))  # the flag's comma-separated form
    if isinstance(value, (datetime.date, datetime.time)):
        value = value.isoformat()
    kind = action.type
    if isinstance(value, (int, float)) and kind in (int, float):
        if kind is int and not isinstance(value, int):
            raise ValueError(f"{where} = {value!r}: the flag takes a whole number")
        typed = kind(value)
    else:
        try:
            typed = kind(str(value)) if kind is not None else str(value)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"{where} = {value!r}: not a valid value for {action.option_strings[0]}: {exc}") from None
    if action.choices is not None and typed not in action.choices:
        raise ValueError(f"{where} = {value!r}: choose one of {', '.join(map(str, action.choices))}")
    return typed


def config_values(sub: argparse.ArgumentParser, table: dict, path) -> dict:
    """dest → value for a config ``table`` read from ``path`` for subcommand parser ``sub``: a key
    is a flag's name (dashes or underscores; an alias too) or ``data``; a value is typed as the flag
    takes it (an array of names for a comma-separated list, a TOML date for a time); an unknown
    key, a flag named twice, or a value the flag refuses is a ValueError naming the key and file."""
    keys, values, named = _config_keys(sub), {}, {}
    command, path = sub.prog.split()[-1], f"--config {path}"
    for key, value in table.items():
        action = keys.get(key.replace("-", "_"))
        if action is None:
            raise ValueError(f"{path}: unknown key {key!r}: not a flag of `recpeft {command}` (see its --help)")
        if action.dest in named:
            raise ValueError(f"{path}: keys {named[action.dest]!r} and {key!r} set the same flag")
        named[action.dest] = key
        values[action.dest] = _typed(action, value, f"{path}: {key}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line parsed, with a ``--config`` file's settings (:func:`config_values`) as the
    defaults of the flags it names: a flag given on the command line wins, and of a mutually
    exclusive pair (``--segment``/``--segments``) the one given on the command line drops the
    file's other. ``args.config_settings``: dest → value of the file (empty without one)."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    subs = _subparsers(parser)
    at = next((i for i, a in enumerate(argv) if a in subs), None)
    if at is None or argv[at] not in CONFIG_COMMANDS:
        args = parser.parse_args(argv)
        args.config_settings = {}
        return args
    sub = subs[argv[at]]
    try:  # a first look, for --config; where it stops (--help, a bad value), the real parse speaks
        with _relaxed(sub), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            given, _ = sub.parse_known_args(argv[at + 1 :])
    except SystemExit:
        given = argparse.Namespace(config=None)
    if given.config is None:
        args = parser.parse_args(argv)
        args.config_settings = {}
        return args
    from recpeft.apps.run_config import read_run_config

    values = config_values(sub, read_run_config(given.config), given.config)
    defaults = {a.dest: a.default for a in sub._actions}
    on_command_line = {d for d in defaults if getattr(given, d, None) != defaults[d]}
    for group in sub._mutually_exclusive_groups:
        members = {a.dest for a in group._group_actions}
        if members & on_command_line:
            for dest in members - on_command_line:
                values.pop(dest, None)
        elif len(members & set(values)) > 1:
            both = " and ".join(sorted(members & set(values)))
            raise ValueError(f"--config {given.config}: {both} exclude each other; keep one")
    sub.set_defaults(**values)  # the parser is this call's own: nothing to restore
    with _relaxed(sub, set(values)):
        args = parser.parse_args(argv)
    args.config_settings = values
    return args


def run_settings(args: argparse.Namespace) -> dict:
    """The settings ``args`` holds, as a run.toml records them: flag name (its first long option;
    ``data`` for the path) → value, for every flag of the subcommand but :data:`NOT_RECORDED` and
    those left at None (none given and none applies); a device as its name."""
    sub = _subparsers(build_parser())[args.command]
    settings = {}
    for action in sub._actions:
        if action.dest in ("help", *NOT_RECORDED):
            continue
        value = getattr(args, action.dest, None)
        if value is None:
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        key = longs[0][2:] if longs else action.dest
        settings[key] = list(value) if isinstance(value, (list, tuple)) else value
        if not isinstance(value, (bool, int, float, str, list, tuple)):
            settings[key] = str(value)
    return settings


def _drop_fx_tracing_note(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(FX_TRACING_NOTE[1])


def quiet_fx_tracing_note() -> None:
    """Drop torch.fx's one note (:data:`FX_TRACING_NOTE`) at the logger that logs it; every other
    record of that logger, and every other logger, is left alone."""
    logging.getLogger(FX_TRACING_NOTE[0]).addFilter(_drop_fx_tracing_note)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ValueError as exc:  # a --config file's problem: named with the file and the key
        command = next((a for a in (argv if argv is not None else sys.argv[1:]) if a in CONFIG_COMMANDS), "")
        print(f"recpeft {command}: error: {error_line(exc)}", file=sys.stderr)
        return 1
    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
        quiet_fx_tracing_note()
        from recpeft.utils.devices import resolve_device

        args.device = resolve_device(args.device, "--device")  # a wrong one stops here, before any work
        from . import commands

        getattr(commands, args.run)(args)
    except (Exception, KeyboardInterrupt) as exc:
        if args.debug:
            raise
        print(f"recpeft {args.command}: error: {error_line(exc)}", file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
