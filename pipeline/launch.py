"""Launching under ``deepspeed``: on this machine (the demo, benches and tests), and one node of many.

``python -m pipeline.launch --nodes "n1 n2" --node-rank R --gpus-per-node 8 --master-addr n1 -- --config cpt.yaml``
starts node R's share of a multi-node run without SSH (what ``launch/train_slurm.sbatch`` runs on
every node): DeepSpeed's runner takes ``--num_nodes > 1`` only with a hostfile, so one is written
from the node list, and ``--no_ssh --node_rank R`` makes this node launch its own ranks only.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cpt_core.commands import prog

from .runtime.ports import free_port

ROOT = Path(__file__).resolve().parents[1]


def gpu_count() -> int:
    """GPUs on this node by nvidia-smi (no torch import: callers answer --help at once); 0 where none."""
    if shutil.which("nvidia-smi") is None:
        return 0
    done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
    return sum(line.startswith("GPU ") for line in done.stdout.splitlines()) if done.returncode == 0 else 0


def stale_build_locks(max_age_s: float = 300.0) -> list[Path]:
    """Lock files of DeepSpeed/torch op builds older than ``max_age_s`` in the extensions directory.

    A build killed mid-way leaves its ``lock``, and the next process to load that op waits on it forever,
    silently; a live build touches nothing for minutes at a time too, so an old lock is only a suspect.
    """
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    now = time.time()
    return sorted(p for p in root.glob("*/*/lock") if p.is_file() and now - p.stat().st_mtime > max_age_s)


def warn_stale_build_locks(log: logging.Logger) -> None:
    for lock in stale_build_locks():
        log.warning(
            "%s is %d minutes old: a DeepSpeed op build killed mid-way leaves it, and the next start then waits on "
            "it forever; if no build is running, delete it",
            lock,
            (time.time() - lock.stat().st_mtime) // 60,
        )


def deepspeed_launcher() -> str:
    """The ``deepspeed`` script of this interpreter's environment (a venv need not be on PATH)."""
    return shutil.which("deepspeed", path=str(Path(sys.executable).parent)) or "deepspeed"


def deepspeed_command(module: str, args: list[str], ranks: int = 2, log_level: str = "warning") -> list[str]:
    """``deepspeed --num_gpus N --module MODULE ARGS`` with this interpreter's launcher and a free port.

    Without GPUs DeepSpeed falls back to its CPU accelerator, one process per rank, with gloo.
    """
    return [
        deepspeed_launcher(),
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


def node_command(
    nodes: list[str],
    node_rank: int,
    gpus_per_node: int,
    master_addr: str,
    master_port: int,
    hostfile: Path,
    module: str,
    args: list[str],
) -> list[str]:
    """The deepspeed command line that starts node ``node_rank``'s ranks of a run over ``nodes``.

    Global rank = node_rank × gpus_per_node + local rank: the order of ``nodes`` is the order of ranks.
    """
    return [
        deepspeed_launcher(),
        "--hostfile",
        str(hostfile),
        "--num_nodes",
        str(len(nodes)),
        "--num_gpus",
        str(gpus_per_node),
        "--node_rank",
        str(node_rank),
        "--master_addr",
        master_addr,
        "--master_port",
        str(master_port),
        "--no_ssh",
        "--module",
        module,
        *args,
    ]


def write_hostfile(nodes: list[str], gpus_per_node: int, path: Path) -> Path:
    """DeepSpeed's hostfile: one ``host slots=N`` line per node, in rank order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{node} slots={gpus_per_node}\n" for node in nodes))
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("pipeline.launch"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--nodes", required=True, help="the run's node names, space-separated, in rank order")
    p.add_argument("--node-rank", type=int, required=True, help="this node's index in --nodes")
    p.add_argument("--gpus-per-node", type=int, required=True, help="ranks on each node")
    p.add_argument("--master-addr", required=True, help="address of node 0, where ranks rendezvous")
    p.add_argument("--master-port", type=int, default=29500)
    p.add_argument("--hostfile", type=Path, help="where to write the hostfile (default: a per-node temporary file)")
    p.add_argument("--module", default="pipeline.train", help="what every rank runs")
    p.add_argument("args", nargs=argparse.REMAINDER, help="after --: the module's arguments (--config ...)")
    a = p.parse_args(argv)
    nodes = a.nodes.split()
    if not 0 <= a.node_rank < len(nodes):
        p.error(f"--node-rank {a.node_rank} is not an index of --nodes ({len(nodes)} nodes)")
    hostfile = a.hostfile or Path(os.environ.get("TMPDIR", "/tmp")) / f"cpt-hostfile-{os.getpid()}"
    write_hostfile(nodes, a.gpus_per_node, hostfile)
    args = a.args[1:] if a.args[:1] == ["--"] else a.args
    command = node_command(nodes, a.node_rank, a.gpus_per_node, a.master_addr, a.master_port, hostfile, a.module, args)
    os.execvpe(command[0], command, launch_env())  # the launcher becomes this process: signals reach it directly


if __name__ == "__main__":
    sys.exit(main())
