"""What every bench shares: a clock (the device synced around each timed call), repeats after a warm-up with
their median and spread, a markdown table, and the last line: ``key=value`` figures, printed and kept with the
run's record (command, commit, machine, date) as JSON in ``runs/bench/NAME.json``."""

from __future__ import annotations

import datetime
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT / "runs" / "bench"
T = TypeVar("T")


def sync() -> None:
    """Wait for the GPU's queued work, so a clock reads the work and not its launch (nothing on CPU)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    """(seconds one call of ``fn`` takes, the device synced before and after; what it returned)."""
    sync()
    start = time.perf_counter()
    result = fn()
    sync()
    return time.perf_counter() - start, result


def clock(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes (:func:`timed` without the result)."""
    return timed(fn)[0]


@dataclass(frozen=True)
class Samples:
    """Repeated measurements of one thing."""

    values: tuple[float, ...]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def spread(self) -> float:
        """The standard deviation (0 for one value)."""
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def show(self, scale: float = 1.0, digits: int = 3) -> str:
        """``median ± std``, times ``scale`` (1e3: milliseconds)."""
        return f"{self.median * scale:.{digits}f} ± {self.spread * scale:.{digits}f}"


def repeat(fn: Callable[[], Any], repeats: int, warmup: int = 0) -> Samples:
    """``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return Samples(tuple(clock(fn) for _ in range(repeats)))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells as given (format numbers before)."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def workspace(prep: str | None) -> tuple[Path, Path]:
    """(a scratch directory every rank of this machine sees, the prep to train on): ``prep``, or the demo's data
    built once by rank 0 in the scratch directory. Collective: every rank calls it."""
    import tempfile

    import torch

    from data_prep.demo import build_demo_data

    rank = int(os.environ.get("RANK", "0"))
    work = [tempfile.mkdtemp(prefix="bench-") if rank == 0 else None]
    torch.distributed.broadcast_object_list(work, src=0)
    if prep:
        return Path(work[0]), Path(prep)
    built = [str(build_demo_data(Path(work[0]) / "demo", quiet=True).mixture.parent) if rank == 0 else None]
    torch.distributed.broadcast_object_list(built, src=0)
    return Path(work[0]), Path(built[0])


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def machine() -> str:
    """The machine a figure was measured on: device, host cores, Python and torch."""
    import torch

    return f"{device_name()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def git_commit() -> str:
    """The code a figure was measured with; ``-dirty`` when the tree had uncommitted changes."""
    try:
        head = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git: the figures are still worth keeping
        return "unknown"
    return head.stdout.strip() or "unknown"


def summary_line(figures: dict[str, Any]) -> str:
    """``key=value ...``: floats with 3 decimals (3 significant digits when tiny or huge), the rest as they print."""

    def show(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.3f}" if v == 0 or 1e-2 <= abs(v) < 1e6 else f"{v:.3g}"

    return " ".join(f"{k}={show(v)}" for k, v in figures.items())


def finish(name: str, figures: dict[str, Any], details: dict[str, Any] | None = None) -> Path:
    """Print the last line and keep the run's record as ``runs/bench/NAME.json`` (replaced atomically)."""
    from cpt_core.atomic import write_json

    print(summary_line(figures), flush=True)
    record = {
        "bench": name,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, "-m", f"bench.{name}", *sys.argv[1:]]),
        "commit": git_commit(),
        "machine": machine(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "figures": _finite(figures),
        "details": _finite(details or {}),
    }
    path = RECORDS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return path


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities as null, so the record is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
