"""The ``recpeft`` command: argument parsing (``main``) and the subcommands (``commands``).

May import ``recpeft.apps`` and everything below it, but only inside a subcommand: building the
parser imports no torch, so ``recpeft --help`` answers at once.
"""

from .main import main

__all__ = ["main"]
