"""``python -m excite``: the same as the ``excite`` command."""
import sys

from excite.cli import main

sys.exit(main())
