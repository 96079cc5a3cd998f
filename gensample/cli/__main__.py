"""``python -m gensample.cli``: the ``gensample`` console script, for environments without it on PATH. An entry point
like scripts/*.py: nothing imports this module, so importing the package from here makes no cycle."""
import sys

from . import main

sys.exit(main())
