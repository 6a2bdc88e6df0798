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
    assert SUBCOMMANDS == ["bench", "demo", "evaluate", "finetune", "merge", "pretrain"]
    demo = subprocess.run(
        [sys.executable, "-m", "recpeft.cli", "demo", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "personalise a pretrained click model per market" in demo  # the demo module's docstring
