"""Faults while writing: a full disk gives one clear error and leaves earlier outputs intact."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .test_cli import assert_user_error, run
from .train_helpers import digest


@pytest.fixture
def small_disk(tmp_path):
    mount_point = tmp_path / "small"  # 600 KB: the general build (~370 KB) fits, general + domain (~810 KB) do not
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount_point)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], capture_output=True)


@pytest.mark.reliability("faults: disk full")
def test_disk_full_during_a_build_is_a_clear_error_and_earlier_builds_stay_intact(sample, small_disk, lost):
    common = ["--tokenizer", str(sample.tokenizer), "--cache", str(small_disk), "--seq-len", "32", "-q",
              "--workers", "0"]
    first = run("build", "--name", "docs", "--role", "general", "--input", str(sample.general), "--txt-mode",
                "file", *common)
    assert first.returncode == 0, first.stderr
    before = digest(small_disk / "general")
    big = run("build", "--name", "code", "--role", "domain", "--input", str(sample.domain), *common)
    assert lost(len(set(before.items()) ^ set(digest(small_disk / "general").items()))) == 0
    assert_user_error(big, "no space left on the device")
    assert not list((small_disk / "domain").rglob("build.json"))  # nothing presented as complete
