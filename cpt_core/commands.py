"""How a command names itself in its usage line: ``cpt NAME`` when started through ``cpt``."""

from __future__ import annotations

import sys


def prog(module: str) -> str:
    """``cpt NAME`` when the ``cpt`` entry point started this command, else ``python -m MODULE``."""
    return sys.argv[0] if sys.argv[0].startswith("cpt ") else f"python -m {module}"
