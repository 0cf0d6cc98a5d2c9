"""User-facing errors: the CLI prints these as one clear line and exits non-zero.

Anything else that escapes is a bug and keeps its traceback.
"""
from __future__ import annotations

import errno


class UserError(Exception):
    """A problem with the user's input, config or environment, not with our code."""


class InputError(UserError):
    """Bad input that can be pinned to a file and, where it applies, a line."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.reason = message


class RejectLimitExceeded(UserError):
    """Too many documents were rejected for the run to be trusted."""


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` is the OS saying the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
