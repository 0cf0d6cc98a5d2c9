"""Progress bars on stderr for long steps; silent under ``--quiet`` or when stderr is not a terminal."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(desc: str, unit: str, total: int | None = None, quiet: bool = False) -> Any:
    return tqdm(
        desc=desc, unit=unit, total=total, disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True, mininterval=0.5
    )
