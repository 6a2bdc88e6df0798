"""The ``recpeft`` command: argument parsing and one-line errors (the work is in
:mod:`.commands`, imported only once a subcommand runs, so ``--help`` imports no torch)."""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import importlib.util
import sys
from pathlib import Path

from recpeft.datasets.formats import FORMATS, MOVIELENS_SEGMENT_ATTRIBUTES, TIME_UNITS

from .defaults import FINETUNE, FINETUNE_LR, METHODS, PRETRAIN, SOURCES

EXAMPLES = """examples:
  recpeft demo                                            # the main job on the embedded shop
  recpeft pretrain log.parquet --segment-col country --categorical category,brand --dense price --out base
  recpeft finetune log.parquet --base base --segment DE --out adapters/DE
  recpeft finetune log.parquet --base base --segments all --method lora,dense --out adapters   # + summary
  recpeft evaluate log.parquet --base base --adapter adapters/DE --segment DE
  recpeft merge --base base --adapter adapters/DE --out base-DE
  recpeft finetune ml-1m/ --base ml-base --segment F --out adapters/F    # MovieLens, segments by gender
  recpeft bench
"""


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
        formatter_class=argparse.RawDescriptionHelpFormatter,
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
    add = lambda name, **kw: sub.add_parser(name, parents=[common], **kw)  # noqa: E731

    demo = add(
        "demo",
        help="the main job on the embedded synthetic shop, with a report",
        description=_module_docstring("recpeft.apps.demo"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--out",
        default="runs/demo",
        help="folder for the base, adapters, report.json and report.png (default: runs/demo)",
    )
    demo.add_argument("--seed", type=int, default=0, help="seeds every model and row order (default: 0)")
    demo.add_argument("--fresh", action="store_true", help="pretrain the base again even if --out holds one")
    _overwrite_argument(demo, "a previous run in --out (its saved base is reused unless --fresh)")
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
    pre.add_argument("--out", required=True, help="folder for the base checkpoint")
    _overwrite_argument(pre, "an existing --out folder")
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
        "--out/<segment>/ per LoRA adapter, --out/<segment>-dense/ per dense copy, and a summary "
        "(summary.json, summary.png)",
    )
    fine.add_argument(
        "--out",
        required=True,
        help="folder for the adapter (or, with --method dense, the copy; with --segments, for all of them)",
    )
    fine.add_argument(
        "--method",
        choices=METHODS,
        default="lora",
        help="a LoRA adapter, dense fine-tuning of a copy of the whole base, or (with --segments) both (default: lora)",
    )
    _overwrite_argument(fine, "an existing --out folder")
    fine.add_argument("--r", type=int, default=4, help="LoRA rank (default: 4)")
    fine.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 2r)")
    fine.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' input (default: 0.0)")
    fine.add_argument(
        "--targets",
        default="",
        help="comma-separated module names to adapt (default: attribute tables and every MLP layer)",
    )
    fine.set_defaults(run="cmd_finetune")

    ev = add("evaluate", help="AUC and LogLoss per segment of a base (with an adapter)")
    _data_arguments(ev, reads_base=True)
    ev.add_argument("--base", required=True, help="base checkpoint folder (from `recpeft pretrain` or `merge`)")
    ev.add_argument(
        "--ignore-base-mismatch", action="store_true", help="apply --adapter even if it was trained on another base"
    )
    ev.add_argument(
        "--adapter", default=None, help="adapter folder to apply to the base (default: none, the base alone)"
    )
    ev.add_argument("--segment", default=None, help="only this segment (default: every segment)")
    ev.add_argument(
        "--part", choices=("train", "valid", "test"), default="test", help="which rows to score (default: test)"
    )
    ev.add_argument("--json", default=None, help="also write the table as JSON here")
    _overwrite_argument(ev, "an existing --json file")
    ev.set_defaults(run="cmd_evaluate")

    merge = add("merge", help="fold an adapter into the base weights; writes a new base checkpoint")
    merge.add_argument("--base", required=True, help="base checkpoint folder the adapter was trained on")
    merge.add_argument("--adapter", required=True, help="adapter folder (from `recpeft finetune`)")
    merge.add_argument("--out", required=True, help="folder for the merged base checkpoint")
    _overwrite_argument(merge, "an existing --out folder")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.threads < 1:
            raise ValueError(f"--threads must be ≥ 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
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
