"""Multi-node launch for real: the per-node command SLURM runs, for two "nodes" on one machine (loopback)."""

from __future__ import annotations

import subprocess

import pytest

from pipeline.launch import ROOT, free_port, launch_env

from .train_helpers import metrics, write_config


def test_two_nodes_started_as_slurm_starts_them_train_exactly_as_one_node_with_two_ranks(reference, prep, tmp_path):
    """launch/slurm_node.sh is what train_slurm.sbatch's srun runs on every node: here node0 and node1, one CPU
    rank each, rendezvous over 127.0.0.1 (DeepSpeed needs a hostfile for --num_nodes > 1; it writes one)."""
    config = write_config(tmp_path / "cpt.yaml", prep, tmp_path / "run", steps=3, checkpoint={"every": 0})
    port = str(free_port())
    nodes = [
        subprocess.Popen(
            [str(ROOT / "launch" / "slurm_node.sh"), "node0 node1", "127.0.0.1", "1", str(config)],
            env={
                **launch_env(),
                "SLURM_NODEID": str(rank),
                "SLURM_JOB_ID": "test",
                "MASTER_PORT": port,
                "TMPDIR": str(tmp_path),
            },
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert (tmp_path / "cpt-hostfile-test-1").read_text() == "node0 slots=1\nnode1 slots=1\n"
    got, single_node = metrics(tmp_path / "run"), metrics(reference[1])
    for step in (1, 2, 3):  # warmup steps: the same lr whatever the run's length
        for key in ("loss", "grad_norm", "lr"):
            assert got[step][key] == pytest.approx(single_node[step][key], rel=1e-6), (step, key)


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
