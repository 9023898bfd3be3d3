"""``python -m kvpress_aqua.cli``: the ``kvtool`` command where its entry-point script is not installed."""

import sys

from . import main

sys.exit(main())
