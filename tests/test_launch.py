"""Multi-node launch for real: the per-rank command SLURM runs, for two "nodes" on one machine (loopback)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.checkpoint.files import CheckpointDir, checkpoint_root
from pipeline.launch import ROOT, free_port, launch_env

from .train_helpers import metrics, write_config


def slurm_tasks(config: Path, tmp_path: Path, port: str) -> list[subprocess.Popen[str]]:
    """launch/slurm_rank.sh as train_slurm.sbatch's srun starts it: here two "nodes" with one CPU rank each,
    rendezvous over 127.0.0.1; each task in its own session, as slurmstepd starts each task's process tree."""
    return [
        subprocess.Popen(
            [str(ROOT / "launch" / "slurm_rank.sh"), str(config)],
            env={
                **launch_env(),
                **{"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": str(rank)},
                **{"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
            },
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        for rank in (0, 1)
    ]


def finished(tasks: list[subprocess.Popen[str]]) -> list[str]:
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    # srun --kill-on-bad-exit kills the job's other tasks when one exits non-zero: every task must exit 0
    assert [task.returncode for task in tasks] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    return outputs


def test_ranks_started_by_srun_save_at_slurms_signal_and_resume_as_one_uninterrupted_run(reference, prep, tmp_path):
    """SIGTERM to every process of both tasks, as SLURM sends it before the time limit: the ranks agree on a
    step, save and exit 0; the same tasks started again resume there, and every step's loss, gradient norm
    and lr equal the uninterrupted 2-rank run's."""
    run = tmp_path / "run"
    config = write_config(tmp_path / "cpt.yaml", prep, run, checkpoint={"every": 0})  # the reference's 12 steps
    tasks = slurm_tasks(config, tmp_path, str(free_port()))
    deadline = time.monotonic() + 600
    log = run / "metrics.jsonl"  # its third line is logged after step 1: both ranks are in the loop
    while time.monotonic() < deadline and not (log.is_file() and len(log.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    for task in tasks:
        os.killpg(task.pid, signal.SIGTERM)
    output = finished(tasks)[0]
    latest = CheckpointDir.latest(checkpoint_root(run))
    assert latest is not None and latest.is_complete(), output[-3000:]
    stopped_at = CheckpointDir(latest.path).state()["step"]
    assert 1 <= stopped_at < 12 and "SIGTERM/SIGINT: saving a checkpoint" in output
    finished(slurm_tasks(config, tmp_path, str(free_port())))
    got, uninterrupted = metrics(run), metrics(reference[1])
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 13):
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(uninterrupted[step][key], rel=1e-6), (step, key)


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch").glob("*.sh")))
def test_every_launch_script_answers_help_and_writes_nothing(script, tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / script), "--help"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0 and ("launch/" in done.stdout or "usage" in done.stdout), done
    assert list(tmp_path.iterdir()) == []


def test_own_model_refuses_a_directory_that_is_not_a_model_before_writing_anything(tmp_path):
    done = subprocess.run(
        ["bash", str(ROOT / "launch" / "own_model.sh"), str(tmp_path / "nothing"), str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "not a Hugging Face model directory" in done.stderr
    assert not (tmp_path / "out").exists()
