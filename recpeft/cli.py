"""The ``recpeft`` command."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, seed=args.seed, progress=not args.quiet)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recpeft",
        description="Parameter-efficient fine-tuning (LoRA) for recommendation models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="end-to-end example on the embedded synthetic shop",
        description="Pretrain a click model on every market of the embedded synthetic shop, train one LoRA "
                    "adapter per small market, save and reload them, route a mixed batch through all adapters "
                    "at once and check it against each market's merged model.",
    )
    demo.add_argument("--out", default="runs/demo", help="folder for adapters, base checkpoint and summary.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, KeyError, IndexError, OSError, RuntimeError) as exc:
        if args.debug:
            raise
        print(f"recpeft {args.command}: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
