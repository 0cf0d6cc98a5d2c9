"""How a command presents itself: ``cpt NAME`` in its usage line when started through ``cpt``, and old flag
names kept working with a warning."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def prog(module: str) -> str:
    """``cpt NAME`` when the ``cpt`` entry point started this command, else ``python -m MODULE``."""
    return sys.argv[0] if sys.argv[0].startswith("cpt ") else f"python -m {module}"


def renamed(new: str) -> type[argparse.Action]:
    """An argparse action for a flag's old name: stores into the new flag's destination and says it was renamed."""

    class Renamed(argparse.Action):
        def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option: Any = None) -> None:
            print(f"warning: {option} is deprecated; use {new}", file=sys.stderr)
            setattr(namespace, self.dest, values)

    return Renamed
