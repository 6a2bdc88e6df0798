"""``recpeft --help`` and every subcommand's ``--help`` answer without importing torch, pandas or
torchrec: the parser is built from plain constants, and a subcommand's modules are imported only
when it runs."""

import subprocess
import sys

import pytest

from recpeft.cli.main import build_parser

HEAVY = ("torch", "pandas", "torchrec", "triton", "numpy")
SUBCOMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)

PROBE = """
import sys
from recpeft.cli.main import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code == 0, exit.code
heavy = sorted(m for m in {heavy!r} if m in sys.modules)
print("imported:", ",".join(heavy))
"""


@pytest.mark.parametrize("argv", [["--help"], *([name, "--help"] for name in SUBCOMMANDS)], ids=" ".join)
def test_help_imports_no_heavy_module(argv):
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY), *argv], capture_output=True, text=True, check=True
    )
    assert "usage: recpeft" in result.stdout
    assert result.stdout.strip().endswith("imported:"), result.stdout[-300:]


def test_every_subcommand_is_listed_and_demo_describes_itself():
    assert SUBCOMMANDS == ["bench", "demo", "evaluate", "finetune", "merge", "pretrain", "score", "serve"]
    demo = subprocess.run(
        [sys.executable, "-m", "recpeft.cli", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "personalise a pretrained click model per market" in demo  # the demo module's docstring


def _options():
    """(subcommand, action) for every option and argument of every subcommand but --help."""
    parser = build_parser()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        yield from ((name, a) for a in sub._actions if a.dest != "help")


def test_every_option_has_help_that_shows_its_default():
    for name, action in _options():
        assert action.help, f"{name} {action.option_strings or action.dest} has no help text"
        if action.default not in (None, False):
            assert str(action.default) in action.help, f"{name} {action.option_strings}: {action.help!r}"


def test_the_training_defaults_in_the_help_are_the_ones_that_run():
    from recpeft.cli.defaults import FINETUNE, FINETUNE_LR, PRETRAIN

    helps = {(name, a.dest): a.help for name, a in _options()}
    for name, defaults in (("pretrain", PRETRAIN), ("finetune", FINETUNE)):
        for field, value in defaults.items():
            assert f"default: {value}" in helps[name, field], (name, field)
    assert all(str(lr) in helps["finetune", "lr"] for lr in FINETUNE_LR.values())
    assert "default: the base's, else 0.2" in helps["finetune", "test_fraction"]


def test_version():
    result = subprocess.run([sys.executable, "-m", "recpeft.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("recpeft 0."), result
