"""The error hierarchy of both packages, and how a command line reports it.

A ``UserError`` is a problem with the user's input, config or environment: the
CLIs print it as one line and exit 2. Anything else that escapes (a
``ValueError`` from inside DeepSpeed or transformers included) is a bug and
keeps its traceback. Library code raises; only ``run_cli`` chooses exit codes.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input, config or environment, not with our code."""


class ConfigError(UserError):
    """A config value or command-line option that cannot be used (names the key and the value)."""


class InputError(UserError):
    """Bad input that can be pinned to a file and, where it applies, a line."""

    def __init__(self, path: str, message: str, line: int | None = None) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line
        self.reason = message


class ConfigProblems(ConfigError):
    """Every problem a check found, reported together (one per line) rather than one per attempt."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__(f"{len(problems)} problem(s): " + "; ".join(problems))
        self.problems = problems


class RejectLimitExceeded(UserError):
    """Too many documents were rejected for the run to be trusted."""


def out_of_space(error: BaseException) -> bool:
    """Whether ``error`` is the OS saying the disk (or the user's quota) is full."""
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def one_line(error: BaseException) -> str:
    """An error message as one log line (some libraries' messages span several)."""
    return " ".join(str(error).split())


def run_cli(
    body: Callable[[], object],
    log: logging.Logger,
    *,
    interrupted: str = "interrupted",
    disk_full: str = "no space left on the device",
) -> int:
    """Run a command's body and turn its outcome into an exit code.

    0 on success (or the int the body returns); a ``UserError`` or a full disk: one
    logged line and 2 (``disk_full`` says what survived); Ctrl-C: ``interrupted`` and 130. Anything else propagates
    with its traceback.
    """
    try:
        code = body()
        return code if isinstance(code, int) else 0
    except ConfigProblems as e:
        log.error("%d problem(s):\n  %s", len(e.problems), "\n  ".join(one_line(p) for p in e.problems))
        return 2
    except UserError as e:
        log.error("%s", one_line(e))
        return 2
    except KeyboardInterrupt:
        log.error("%s", interrupted)
        return 130
    except OSError as e:
        if not out_of_space(e):
            raise
        log.error("%s: %s", e.filename or "output", disk_full)
        return 2
