"""Damaged, half-written and hostile checkpoints: a clear error naming the file, nothing run, nothing deleted."""

from __future__ import annotations

import builtins
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from cpt_core.errors import UserError
from pipeline.checkpoint.files import COMPLETE, write_complete
from pipeline.checkpoint.manager import CheckpointManager

from .train_helpers import ROOT, digest, env, write_config

LAST, EARLIER = "step00000012", "step00000010"
OPTIM = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
MODEL = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@pytest.fixture
def run(reference, tmp_path) -> Path:
    """A copy of the reference run's checkpoints, to damage."""
    shutil.copytree(reference[1] / "checkpoints", tmp_path / "run" / "checkpoints")
    return tmp_path / "run"


class Payload:
    """Unpickling this opens (creates) a file: proof that code from the checkpoint ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return builtins.open, (str(self.marker), "w")


def hostile(tag_dir: Path, marker: Path) -> None:
    """Replace the model states with a pickle that runs code, and re-sign the manifest as an attacker could."""
    torch.save({"module": Payload(marker)}, tag_dir / MODEL)
    write_complete(tag_dir, world=2)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])  # same size, other bytes
    path.write_bytes(bytes(data))


DAMAGE = {
    "truncated file": (lambda d: truncate(d / OPTIM), OPTIM, "truncated or overwritten"),
    "flipped bytes": (lambda d: flip_bytes(d / OPTIM), OPTIM, "CRC mismatch"),
    "missing rank file": (lambda d: (d / OPTIM).unlink(), OPTIM, "missing"),
    "unreadable manifest": (lambda d: (d / COMPLETE).write_bytes(b"\x00garbage"), COMPLETE, "unreadable"),
}


@pytest.mark.reliability("checkpoints")
@pytest.mark.parametrize("kind", sorted(DAMAGE))
def test_a_damaged_latest_checkpoint_is_refused_naming_the_file_and_the_one_before(kind, run, lost):
    damage, name, reason = DAMAGE[kind]
    damage(run / "checkpoints" / LAST)
    before = digest(run)
    with pytest.raises(UserError) as error:
        CheckpointManager(run / "checkpoints", keep_last=10, rank=0, world=1).resolve("auto")
    message = str(error.value)
    assert lost(len(set(before.items()) ^ set(digest(run).items()))) == 0  # refused, nothing removed
    assert name in message and reason in message, message
    assert f"checkpoint.resume={run / 'checkpoints' / EARLIER}" in message


@pytest.mark.reliability("checkpoints")
def test_a_half_written_checkpoint_is_never_taken_and_an_explicit_one_is_refused(run, lost):
    half = run / "checkpoints" / "step00000014"  # a save killed before every rank had written
    shutil.copytree(run / "checkpoints" / LAST, half)
    (half / COMPLETE).unlink()
    truncate(half / OPTIM)
    manager = CheckpointManager(run / "checkpoints", keep_last=10, rank=0, world=1)
    assert manager.resolve("auto") == (run / "checkpoints", LAST)
    with pytest.raises(UserError, match=f"{half}: not a complete checkpoint"):
        manager.resolve(str(half))
    assert lost(0 if (run / "checkpoints" / LAST / COMPLETE).is_file() else 1) == 0


@pytest.mark.reliability("security")
def test_a_checkpoint_that_would_run_code_is_refused_before_anything_unpickles_it(run, prep, tmp_path, lost):
    marker = tmp_path / "code_ran"
    hostile(run / "checkpoints" / LAST, marker)
    with pytest.raises(UserError, match=rf"{MODEL}: refused by the weights-only loader: .*GLOBAL"):
        CheckpointManager(run / "checkpoints", keep_last=10, rank=0, world=1).resolve("auto")
    export = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.export",
            "--checkpoint",
            str(run / "checkpoints" / LAST),
            "--out",
            str(tmp_path / "hf"),
        ],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert export.returncode == 2 and "Traceback" not in export.stderr and "weights-only" in export.stderr
    assert not marker.exists() and not (tmp_path / "hf").exists()
    lost(0)


class ByName:
    """Pickles as ``getattr(owner, name)``: how Python 3.11.2 pickles an enum member, and a way to reach further."""

    def __init__(self, owner: object, name: str) -> None:
        self.owner, self.name = owner, name

    def __reduce__(self):
        return getattr, (self.owner, self.name)


@pytest.mark.reliability("security")
def test_enum_members_pickled_by_name_pass_the_check_and_no_other_getattr_does(tmp_path, lost):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from pipeline.checkpoint.files import file_problem

    def saved(name: str, value: object) -> tuple[Path, int]:
        path = tmp_path / f"{name}.pt"
        torch.save({"zero_stage": value, "state": torch.ones(3)}, path)
        return path, path.stat().st_size

    assert file_problem(*saved("by_value", ZeroStageEnum.weights)) is None
    assert file_problem(*saved("by_name", ByName(ZeroStageEnum, "weights"))) is None
    reaches = {
        "a method of an allowed class": ByName(LossScaler, "update_scale"),
        "not a member": ByName(ZeroStageEnum, "__class__"),
        "a tensor method": ByName(torch.Tensor, "add_"),
    }
    refused = {what: file_problem(*saved(what.replace(" ", "_"), value)) for what, value in reaches.items()}
    assert lost(sum(problem is None for problem in refused.values())) == 0, refused
    assert all("weights-only" in problem for problem in refused.values()), refused


@pytest.mark.reliability("checkpoints")
def test_training_on_a_damaged_checkpoint_exits_with_one_line_and_keeps_it(run, prep, tmp_path, lost):
    truncate(run / "checkpoints" / LAST / OPTIM)
    before = digest(run / "checkpoints")
    config = write_config(tmp_path / "cpt.yaml", prep, run)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.train", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert lost(len(set(before.items()) ^ set(digest(run / "checkpoints").items()))) == 0
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"{OPTIM}: " in result.stderr and "truncated" in result.stderr


@pytest.mark.reliability("security")
def test_export_never_replaces_a_directory_that_is_not_an_export(reference, tmp_path, lost):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "todo.txt").write_text("keep me\n")
    checkpoint = reference[1] / "checkpoints" / LAST
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.export", "--checkpoint", str(checkpoint), "--out", str(precious)],
        capture_output=True,
        text=True,
        env=env(),
        cwd=ROOT,
        timeout=300,
    )
    assert lost(0 if (precious / "todo.txt").read_text() == "keep me\n" else 1) == 0
    assert result.returncode == 2 and "is not an earlier export" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_manifest_lists_every_file_a_save_wrote(reference):
    tag_dir = reference[1] / "checkpoints" / LAST
    manifest = json.loads((tag_dir / COMPLETE).read_text())
    on_disk = {
        p.relative_to(tag_dir).as_posix(): p.stat().st_size
        for p in tag_dir.rglob("*")
        if p.is_file() and p.name != COMPLETE
    }
    assert manifest["files"] == on_disk and manifest["world"] == 2
    assert {MODEL, OPTIM, "pipeline_state.json", "rng_rank00001.safetensors"} <= set(on_disk)


class FakeEngine:
    """Writes one file per save like DeepSpeed would, or dies half-way (a kill) when told to."""

    def __init__(self, die: bool = False) -> None:
        self.die = die

    def save_checkpoint(
        self, root: str, tag: str, client_state: dict, save_latest: bool, exclude_frozen_parameters: bool = False
    ) -> None:
        (Path(root) / tag).mkdir(parents=True, exist_ok=True)
        torch.save({"module": {"w": torch.ones(3)}}, Path(root) / tag / "zero_pp_rank_0_mp_rank_00_model_states.pt")
        if self.die:
            raise KeyboardInterrupt("killed mid-save")


@pytest.mark.reliability("checkpoints")
def test_a_step_saved_again_never_leaves_latest_on_a_directory_being_written(tmp_path, lost):
    """Resumed from step 4 while an abandoned branch's step 6 is latest, and a half-written step 8 is left over."""
    manager = CheckpointManager(tmp_path, keep_last=10, rank=0, world=1)
    for step in (4, 6):
        manager.save(FakeEngine(), step, {"step": step})
    (tmp_path / "step00000008").mkdir()
    (tmp_path / "step00000008" / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"stale, other world")
    with pytest.raises(KeyboardInterrupt):
        manager.save(FakeEngine(die=True), 6, {"step": 6})  # killed while rewriting step 6
    assert lost(0 if manager.resolve("auto") == (tmp_path, "step00000004") else 1) == 0
    manager.save(FakeEngine(), 8, {"step": 8})
    assert sorted(p.name for p in (tmp_path / "step00000008").iterdir()) == [
        COMPLETE,
        "pipeline_state.json",
        "rng_rank00000.safetensors",
        "zero_pp_rank_0_mp_rank_00_model_states.pt",
    ]
    assert manager.resolve("auto") == (tmp_path, "step00000008")


@pytest.mark.reliability("checkpoints")
def test_old_checkpoints_are_unmarked_at_once_and_deleted_off_the_training_path(tmp_path, lost):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1)
    for step in (2, 4, 6):
        manager.save(FakeEngine(), step, {"step": step})
    manager.wait_for_deletions()
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000004", "step00000006"]
    gate = threading.Event()
    original = shutil.rmtree
    with pytest.MonkeyPatch.context() as patch:  # a slow file system: the deletion waits for the gate
        patch.setattr(shutil, "rmtree", lambda path, **kw: (gate.wait(10), original(path, **kw)))
        manager.save(FakeEngine(), 8, {"step": 8})  # returns while step 4 is still being deleted
        assert (tmp_path / "step00000004").is_dir() and not (tmp_path / "step00000004" / COMPLETE).exists()
        assert lost(0 if manager.resolve("auto") == (tmp_path, "step00000008") else 1) == 0
        gate.set()
        manager.wait_for_deletions()
    assert sorted(p.name for p in tmp_path.glob("step*")) == ["step00000006", "step00000008"]


def test_ranks_wait_for_a_universal_conversion_on_the_file_system_and_hear_of_its_failure(tmp_path):
    waiting = CheckpointManager(tmp_path / "run", keep_last=2, rank=1, world=2)
    target, failed = tmp_path / "run" / "step00000004_universal", tmp_path / "run" / "step00000004_universal.failed"
    target.mkdir(parents=True)

    def convert_later() -> None:
        time.sleep(0.3)
        write_complete(target, universal=True, source="/src/step00000004")

    threading.Thread(target=convert_later).start()
    started = time.monotonic()
    waiting._await_conversion(target, "/src/step00000004", failed, poll_s=0.05)  # no collective involved
    assert time.monotonic() - started >= 0.25
    failed.write_text("conversion failed")
    with pytest.raises(UserError, match="rank 0 could not convert /src/other"):
        waiting._await_conversion(target, "/src/other", failed, poll_s=0.05)


def test_only_a_failed_write_is_reported_as_a_full_disk(tmp_path, monkeypatch):
    manager = CheckpointManager(tmp_path, keep_last=2, rank=0, world=1)
    manager.save(FakeEngine(), 2, {"step": 2})
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 0))  # nothing free
    assert manager._out_of_space(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"))
    assert manager._out_of_space(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 233280 vs 2"))
    assert not manager._out_of_space(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert manager._out_of_space(OSError(28, "No space left on device"))
