"""Faults while writing: a full disk gives one clear error and leaves earlier outputs intact."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from .test_cli import assert_user_error, run
from .train_helpers import digest


@contextlib.contextmanager
def tmpfs(mount_point: Path, size: str) -> Iterator[Path]:
    """A small disk of ``size`` at ``mount_point`` (a new, empty directory), unmounted afterwards."""
    mount_point.mkdir()
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount_point)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    with tmpfs(tmp_path / "small", "600k") as mount_point:  # the general build (~370 KB) fits, + domain (~810 KB) not
        yield mount_point


@pytest.mark.reliability("faults: disk full")
def test_disk_full_during_a_build_is_a_clear_error_and_earlier_builds_stay_intact(sample, small_disk, lost):
    common = [
        "--tokenizer",
        str(sample.tokenizer),
        "--cache",
        str(small_disk),
        "--seq-len",
        "32",
        "-q",
        "--workers",
        "0",
    ]
    first = run(
        "build", "--name", "docs", "--role", "general", "--input", str(sample.general), "--txt-mode", "file", *common
    )
    assert first.returncode == 0, first.stderr
    before = digest(small_disk / "general")
    big = run("build", "--name", "code", "--role", "domain", "--input", str(sample.domain), *common)
    assert lost(len(set(before.items()) ^ set(digest(small_disk / "general").items()))) == 0
    assert_user_error(big, "no space left on the device")
    assert not list((small_disk / "domain").rglob("build.json"))  # nothing presented as complete


@pytest.mark.reliability("faults: disk full")
def test_disk_full_during_a_checkpoint_save_is_one_line_and_the_last_checkpoint_stays_latest(prep, tmp_path, lost):
    from pipeline.checkpoint.files import CheckpointDir, verify_checkpoint

    from .train_helpers import env, launcher_command, write_config

    # checkpoints of this model take 1.4 MB: two fit in 3.5 MB, the third does not
    with tmpfs(tmp_path / "run", "3500k") as run:
        config = write_config(tmp_path / "cpt.yaml", prep, run)
        result = subprocess.run(launcher_command(config), capture_output=True, text=True, env=env(), timeout=600)
        latest = CheckpointDir.latest_of_run(run)
        saved = digest(latest.path)
        verify_checkpoint(latest.path)  # complete and intact
        assert lost(0 if latest.tag == CheckpointDir.for_step(latest.root, 4).tag else 1) == 0, latest
        assert result.returncode != 0
        output = (result.stdout + result.stderr).splitlines()
        # The saving rank's one line; its peer may print a traceback first (the run_cli call's source line
        # quotes "no space left" too), so the line is found by what only the message says.
        message = next(line for line in output if "no space left on the device while saving step 6" in line)
        assert latest.tag in message.split("no space left")[1]
        assert digest(latest.path) == saved
