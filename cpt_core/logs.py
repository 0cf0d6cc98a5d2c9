"""One logging setup for every entry point: a timestamped line per record, rank 0 at full level.

Under the deepspeed launcher every rank writes to the same terminal or batch log;
ranks other than 0 log warnings and errors only, so a line appears once.
"""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
BRIEF_FORMAT = "%(asctime)s %(message)s"


def process_rank() -> int:
    """This process's global rank as the launcher set it (0 outside a distributed launch)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(level: int = logging.INFO, brief: bool = False) -> None:
    """Configure the root logger once per process; ``brief`` drops level and logger name (demo, benches)."""
    if process_rank() != 0:
        level = max(level, logging.WARNING)
    logging.basicConfig(level=level, format=BRIEF_FORMAT if brief else FORMAT, datefmt="%H:%M:%S")
