"""``python -m recpeft.cli``: the ``recpeft`` command."""

import sys

from .main import main

sys.exit(main())
