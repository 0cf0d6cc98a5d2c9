"""``python -m pipeline COMMAND ...``: the same entry point as the ``cpt`` console script."""

import sys

from pipeline.cli import main

sys.exit(main())
