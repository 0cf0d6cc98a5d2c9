"""kill -9 at random points, several seeds: nothing is lost.

Training: one rank of a 2-rank ZeRO-3 run is killed at a random step, or the
moment a checkpoint directory appears (mid-save); the launcher takes the other
rank down; a resume ends with the uninterrupted run's weights, bit for bit, and
``latest`` never names a half-written checkpoint. Data prep: ``prepare`` is
killed at a random moment and rerun; its output is byte-identical to a clean
run. Minutes per seed, so marked slow: ``python -m bench.reliability`` runs
them (``pytest -m slow`` does too).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.checkpoint.files import CheckpointDir, checkpoint_root

from .train_helpers import ROOT, digest, env, final_weights, run_training, start_training, write_config

TRAIN_SEEDS = range(6)  # even: kill at a random step; odd: kill inside a checkpoint save
PREP_SEEDS = range(10)


def rank_pids(session: int) -> dict[int, int]:
    """RANK → pid of the training processes the launcher started in process group ``session``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != session or b"pipeline.train" not in (entry / "cmdline").read_bytes():
                continue
            environ = dict(
                item.split(b"=", 1) for item in (entry / "environ").read_bytes().split(b"\0") if b"=" in item
            )
        except (OSError, ValueError):
            continue
        if b"RANK" in environ and b"LOCAL_RANK" in environ:
            found[int(environ[b"RANK"])] = int(entry.name)
    return found


def wait_for(condition, proc: subprocess.Popen, timeout: float = 600, poll: float = 0.0005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if condition():
            return True
        time.sleep(poll)
    return False


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@pytest.mark.slow
@pytest.mark.reliability("faults: training kills")
@pytest.mark.parametrize("seed", TRAIN_SEEDS)
def test_kill_one_rank_at_a_random_point_then_resume_gives_the_uninterrupted_weights(
    seed, reference, prep, tmp_path, lost, record_property
):
    rng = random.Random(seed)
    victim, in_save = rng.randrange(2), seed % 2 == 1
    run = tmp_path / "run"
    config = write_config(tmp_path / "cpt.yaml", prep, run)
    proc = start_training(config)
    try:
        if in_save:  # the moment the save's directory appears, before its COMPLETE marker
            tag = CheckpointDir.for_step(checkpoint_root(run), 2 * rng.randint(1, 5)).path
            reached = wait_for(tag.is_dir, proc)
        else:  # part-way into a random step
            step = rng.randint(1, 11)
            reached = wait_for(lambda: lines(run / "metrics.jsonl") >= step, proc, poll=0.005)
            time.sleep(rng.uniform(0, 0.05))
        assert reached, "the run ended before the kill point"
        os.kill(rank_pids(proc.pid)[victim], signal.SIGKILL)
        mid_save = in_save and not CheckpointDir(tag).is_complete()
        proc.wait(timeout=120)  # the launcher notices the dead rank and stops the other
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    record_property(
        "kill_point",
        f"rank {victim} {'in the save of ' + tag.name if in_save else f'in step {step}'}"
        f"{' (mid-save)' if mid_save else ''}",
    )
    latest = CheckpointDir.latest(checkpoint_root(run))
    assert latest is None or latest.is_complete()
    run_training(config)  # resume: auto
    a, b = final_weights(reference[1]), final_weights(run)
    assert lost(sum(not torch.equal(a[k], b.get(k, torch.empty(0))) for k in a)) == 0
    assert a.keys() == b.keys()


@pytest.mark.slow
@pytest.mark.reliability("faults: data prep kills")
@pytest.mark.parametrize("seed", PREP_SEEDS)
def test_prepare_killed_at_a_random_moment_then_rerun_is_byte_identical(seed, sample, tmp_path, lost, record_property):
    config = tmp_path / "prep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "tokenizer": str(sample.tokenizer),
                "out": "out",
                "seq_len": 64,
                "docs_per_chunk": 8,
                "workers": 2,
                "sources": [
                    {"name": "code", "role": "domain", "paths": [str(sample.domain)]},
                    {"name": "docs", "role": "general", "paths": [str(sample.general)]},
                ],
                "mix": {"general_ratio": 0.15, "batch_rows": 4},
                "replay": {"num_samples": 16, "replay_len": 32},
                "holdout": {"fraction": 0.05},
            }
        )
    )
    command = [sys.executable, "-m", "data_prep", "prepare", "--config", str(config), "-q"]
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True, env=env(), cwd=ROOT, timeout=600)
    clean_seconds = time.monotonic() - started
    clean = digest(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")

    delay = random.Random(seed).uniform(0.05, 0.95) * clean_seconds
    proc = subprocess.Popen(
        command, env=env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    time.sleep(delay)
    os.killpg(proc.pid, signal.SIGKILL)  # the reader and its workers
    proc.wait()
    out = tmp_path / "out"
    builds = len(list(out.glob("cache/*/*/build.json")))
    done = [
        name
        for name in ("mixture/manifest.json", "holdout/holdout.json", "replay/replay.json", "prep.json")
        if (out / name).exists()
    ] + [f"{builds} build{'' if builds == 1 else 's'}"]
    record_property("kill_point", f"{delay:.2f} s of {clean_seconds:.2f} s; done by then: {', '.join(done)}")
    rerun = subprocess.run(command, capture_output=True, text=True, env=env(), cwd=ROOT, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = digest(tmp_path / "out")
    assert lost(len(set(clean.items()) ^ set(after.items()))) == 0
