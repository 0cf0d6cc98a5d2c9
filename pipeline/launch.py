"""Run a pipeline module under the ``deepspeed`` launcher on this machine: the demo, benches and tests share it."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A port nobody listens on: the launcher's default (29500) may be taken by another job."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deepspeed_command(module: str, args: list[str], ranks: int = 2, log_level: str = "warning") -> list[str]:
    """``deepspeed --num_gpus N --module MODULE ARGS`` with this interpreter's launcher and a free port.

    Without GPUs DeepSpeed falls back to its CPU accelerator, one process per rank, with gloo.
    """
    launcher = shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"
    return [
        launcher,
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        "--log_level",
        log_level,
        "--module",
        module,
        *args,
    ]


def launch_env() -> dict[str, str]:
    """The environment for a launched run: this one, with the repository importable from any cwd."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def run_deepspeed(
    module: str,
    args: list[str],
    ranks: int = 2,
    capture: bool = False,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``module`` on ``ranks`` local ranks and wait; ``env`` adds to ``launch_env()``. The caller checks
    ``returncode``."""
    return subprocess.run(
        deepspeed_command(module, args, ranks),
        cwd=ROOT,
        env={**launch_env(), **(env or {})},
        text=True,
        capture_output=capture,
        timeout=timeout,
    )
