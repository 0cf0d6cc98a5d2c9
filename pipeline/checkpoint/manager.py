"""Checkpoints that are either complete or ignored, and resume that continues exactly.

A checkpoint is DeepSpeed's own (weights, optimizer and scheduler, each rank's
partition) plus our state: step, tokens seen, replay sampler, config, and
every rank's RNG state (safetensors, no pickle). Only once every rank has
written does rank 0 drop a ``COMPLETE`` manifest (every file and its size)
into the tag directory and atomically point ``latest`` at it. Resume takes
``latest``; directories without the marker (a kill mid-save) are never taken
and are removed. Before DeepSpeed unpickles anything, every file is checked
against the manifest, its CRCs and torch's weights-only loader
(checkpoint_files). Everything is written under the run's checkpoint
directory, a universal conversion of another run's checkpoint included.

With DeepSpeed's decoupled writer (``checkpoint.writer.decoupled`` in the
DeepSpeed JSON), a save hands the state to a writer process per rank and
returns; :meth:`CheckpointManager.commit` waits for the writers before the
next optimizer step changes that state, and only then marks it complete.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import logging
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from cpt_core.errors import UserError, out_of_space

from .files import (
    COMPLETE,
    LATEST,
    CheckpointDir,
    deepspeed_safe_globals,
    latest_tag,
    point_latest,
    read_complete,
    verify_checkpoint,
    write_complete,
)

log = logging.getLogger(__name__)

# How torch's zip writer (caffe2 inline_container) words a write that did not go through.
WRITE_FAILURES = ("file write failed", "unexpected pos", "PytorchStreamWriter failed")


@dataclass
class _PendingSave:
    """A save whose files DeepSpeed's writer processes are still writing."""

    tag: str
    step: int
    state: dict[str, Any]
    started: float  # time.monotonic() when the save began


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int, world: int, trained_only: bool = False) -> None:
        """``trained_only``: save the trainable tensors alone (adapters); the frozen ones are the base's files."""
        self.root, self.keep_last, self.rank, self.world = Path(root), keep_last, rank, world
        self.trained_only = trained_only
        self.last_save_seconds: float | None = None  # this process's latest save, from its start to COMPLETE
        self.last_block_seconds: float | None = None  # how long that save held up training (save + commit)
        self._pending: _PendingSave | None = None
        self._deleting: threading.Thread | None = None

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        """Write a checkpoint of the current step; with a decoupled writer, only start it (see :meth:`commit`)."""
        started = time.monotonic()
        self.commit(engine)  # one save in flight at a time
        tag = CheckpointDir.for_step(self.root, step).tag
        if self.rank == 0:
            self.wait_for_deletions()  # the previous save's, so nothing deletes while this one writes
            self._make_room(tag)
        _barrier()
        try:
            engine.save_checkpoint(
                str(self.root),
                tag=tag,
                client_state={"pipeline": state},
                save_latest=False,
                exclude_frozen_parameters=self.trained_only,
            )
            rng = {"cpu": torch.get_rng_state()}
            if torch.cuda.is_available():
                rng["cuda"] = torch.cuda.get_rng_state()
            save_file(rng, str(CheckpointDir(self.root / tag).rng_file(self.rank)))
        except Exception as e:  # torch.save reports a full disk as an opaque RuntimeError
            if self._out_of_space(e):
                raise UserError(
                    f"{self.root / tag}: no space left on the device while saving step {step}; it is "
                    f"not marked complete and {self.root / LATEST} still names "
                    f"{latest_tag(self.root) or 'nothing'}"
                ) from None
            raise
        self._pending = _PendingSave(tag, step, state, started)
        if not _decoupled(engine):
            self._mark_complete()
        self.last_block_seconds = time.monotonic() - started
        return self.root / tag

    def commit(self, engine: Any) -> None:
        """Finish the save in flight, if any: wait for this rank's writer, then mark the checkpoint complete.

        Called before the optimizer step after a save (the state the writers read from must not change under
        them, DeepSpeed's own rule), and at once after the last and a signal's save. DeepSpeed's commit in
        ``engine.step`` then finds nothing to do.
        """
        if self._pending is None:
            return
        started = time.monotonic()
        writer = engine.checkpoint_engine
        info, problem = writer.get_commit_info(), ""
        if info is not None:
            try:
                writer.commit(info)  # waits for this rank's writer process to have written every file
            except RuntimeError as e:  # the writer died (its own error is above in this rank's log) or timed out
                problem = str(e)
        if not _all_ranks_agree(not problem, engine.device):  # every rank raises, none waits in _mark_complete
            tag, self._pending = self._pending.tag, None
            raise UserError(
                f"{self.root / tag}: a rank's checkpoint writer did not finish "
                f"({problem or 'see the other ranks'}); it is not marked complete and {self.root / LATEST} "
                f"still names {latest_tag(self.root) or 'nothing'}"
            )
        self.last_block_seconds = (self.last_block_seconds or 0.0) + time.monotonic() - started
        self._mark_complete()

    def _mark_complete(self) -> None:
        """Every rank's files are on disk: rank 0 writes our state and COMPLETE, then points ``latest`` there."""
        pending, self._pending = self._pending, None
        assert pending is not None
        _barrier()
        if self.rank == 0:
            CheckpointDir(self.root / pending.tag).write_state(pending.state)
            write_complete(self.root / pending.tag, world=self.world)
            point_latest(self.root, pending.tag)
            log.info("checkpoint: step %d → %s", pending.step, self.root / pending.tag)
        _barrier()
        if self.rank == 0:  # after the barrier: the other ranks train on while old checkpoints are deleted
            self._purge_in_background(keep=pending.tag)
        self.last_save_seconds = time.monotonic() - pending.started

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """The checkpoint to resume from, (root, tag), with its files checked; None to start fresh."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            verify_checkpoint(path, self.rank, self.world)
            return path.parent, path.name
        latest = CheckpointDir.latest(self.root)
        if latest is None:
            return None
        tag = latest.tag
        try:
            verify_checkpoint(latest.path, self.rank, self.world)
        except UserError as e:
            earlier = [p.name for p in self._complete() if p.name < tag]
            hint = f" (the one before it: checkpoint.resume={self.root / earlier[-1]})" if earlier else ""
            raise UserError(f"{self.root / LATEST} names {tag}, which cannot be resumed: {e}{hint}") from None
        return self.root, tag

    def resume_point(self, resume: str) -> tuple[tuple[Path, str] | None, bool]:
        """(checkpoint to resume from or None, whether it is a universal conversion).

        A checkpoint another number of ranks wrote is converted once to DeepSpeed's universal format,
        which the engine must then be told to load (``checkpoint.load_universal``).
        """
        found = self.resolve(resume)
        if found and self.saved_world(*found) != self.world:
            return self.to_universal(*found), True
        return found, False

    def saved_world(self, root: Path, tag: str) -> int:
        return CheckpointDir(root / tag).state()["world"]

    def to_universal(self, root: Path, tag: str) -> tuple[Path, str]:
        """Convert a checkpoint once to DeepSpeed's universal format, which loads on any number of ranks.

        The conversion goes into this run's checkpoint directory, wherever the source lives.
        """
        target = CheckpointDir(root / tag).universal(self.root).path
        source = str((root / tag).resolve())
        failed = target.with_name(target.name + ".failed")
        if self.rank == 0:
            failed.unlink(missing_ok=True)  # a marker of an earlier attempt, gone before anyone looks
        _barrier()
        if self.rank == 0 and not self._converted(target, source):
            log.info("checkpoint %s was written by another number of ranks: converting it to %s", tag, target)
            shutil.rmtree(target, ignore_errors=True)
            self.root.mkdir(parents=True, exist_ok=True)
            command = [
                sys.executable,
                "-m",
                "deepspeed.checkpoint.ds_to_universal",
                "--input_folder",
                str(root / tag),
                "--output_folder",
                str(target),
            ]
            try:
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
            except (subprocess.CalledProcessError, OSError):
                failed.write_text(f"conversion of {source} failed; see rank 0's log\n")
                raise
            CheckpointDir(target).write_state(CheckpointDir(root / tag).state())
            write_complete(target, universal=True, source=source)
        elif self.rank != 0:
            self._await_conversion(target, source, failed)
        _barrier()
        verify_checkpoint(target, self.rank, self.world)
        return self.root, target.name

    def _await_conversion(self, target: Path, source: str, failed: Path, poll_s: float = 2.0) -> None:
        """Wait for rank 0's conversion by watching the (shared) checkpoint directory, not in a collective:
        NCCL's barrier gives up after its timeout (10 minutes), and converting an 8B model takes longer."""
        waited = 0.0
        while not self._converted(target, source):
            if failed.is_file():
                raise UserError(f"{target}: rank 0 could not convert {source} to the universal format")
            time.sleep(poll_s)
            waited += poll_s
            if waited % 300 < poll_s:
                log.info("waiting for rank 0 to convert %s (%.0f min so far)", source, waited / 60)

    @staticmethod
    def _converted(target: Path, source: str) -> bool:
        try:
            return read_complete(target).get("source") == source
        except UserError:
            return False

    def load(self, engine: Any, root: Path, tag: str) -> dict[str, Any]:
        with deepspeed_safe_globals():  # every file passed the weights-only check already (resolve)
            _, client = engine.load_checkpoint(
                str(root),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
                load_module_strict=not self.trained_only,  # the frozen tensors are not in it
            )
        if client is None:
            raise UserError(f"{root / tag}: DeepSpeed could not load this checkpoint")
        rng_path = CheckpointDir(root / tag).rng_file(self.rank)
        if rng_path.is_file():  # absent in a universal checkpoint: RNG states are per rank
            rng = load_file(str(rng_path))
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        log.info("resumed from %s", root / tag)
        return client["pipeline"]

    def _out_of_space(self, error: Exception) -> bool:
        """Whether a failed save failed for want of space: ENOSPC, or torch's serializer failing to write
        (it reports a full disk without an errno: "file write failed", "unexpected pos N vs M") while less
        is free than the last checkpoint took. Any other error (a CUDA fault, a bug) is not blamed on space."""
        if out_of_space(error) or "No space left" in str(error):
            return True
        if not any(marker in str(error) for marker in WRITE_FAILURES):
            return False
        complete = self._complete()
        needed = sum(read_complete(complete[-1])["files"].values()) if complete else 1 << 20
        return shutil.disk_usage(self.root).free < needed

    def _tags(self) -> list[Path]:
        return [c.path for c in CheckpointDir.saved(self.root)]

    def _complete(self) -> list[Path]:
        return [c.path for c in CheckpointDir.saved(self.root) if c.is_complete()]

    def _make_room(self, tag: str) -> None:
        """Clear ``tag`` before it is written: a half-written save of it, or a checkpoint of the branch a
        resume from an earlier checkpoint left. ``latest`` never names a directory being written."""
        target = self.root / tag
        if not target.exists():
            return
        if latest_tag(self.root) == tag:
            earlier = [p.name for p in self._complete() if p.name < tag]
            point_latest(self.root, earlier[-1] if earlier else None)
        log.warning(
            "checkpoint %s exists (%s); replacing it",
            target,
            "complete, from a branch resumed away from" if CheckpointDir(target).is_complete() else "half-written",
        )
        shutil.rmtree(target)

    def _purge_in_background(self, keep: str) -> None:
        """Delete half-written checkpoints and those beyond ``keep_last`` on a thread: removing a large
        checkpoint takes minutes on some file systems, and no rank should wait for it.

        The doomed directories are chosen and unmarked (``COMPLETE`` removed) here, first, so a deletion
        cut short never leaves a directory that looks complete.
        """
        self.wait_for_deletions()
        doomed = [p for p in self._tags() if not CheckpointDir(p).is_complete() and p.name != keep]
        doomed += [p for p in self._complete()[: -self.keep_last] if p.name != keep]
        for p in doomed:
            (p / COMPLETE).unlink(missing_ok=True)
        self._deleting = threading.Thread(target=_remove_all, args=(doomed,), name="checkpoint-purge")
        self._deleting.start()

    def wait_for_deletions(self) -> None:
        if self._deleting is not None:
            self._deleting.join()
            self._deleting = None


def _remove_all(paths: list[Path]) -> None:
    for p in paths:
        shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def signals_held_for_writers(enabled: bool) -> Iterator[None]:
    """Block SIGTERM and SIGINT in this thread while DeepSpeed spawns its checkpoint writers (``enabled``: the
    config has them), which inherit the blocked mask (across fork and exec) and so never see them.

    SLURM signals every process of the job step and Ctrl-C the whole process group: a writer killed by the
    signal would lose the very save the signal asks for (the ranks then cannot commit it). A signal that
    arrives meanwhile is held, not lost: it reaches this process when the block ends. The writers stop at
    exit (:func:`watch_writer`), or by SIGKILL: the launchers kill a rank's whole process tree, SLURM its step.
    """
    if not enabled:
        yield
        return
    held = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def watch_writer(engine: Any, timeout_minutes: float) -> None:
    """Set up this rank's DeepSpeed writer process, if the engine has one (call right after ``initialize``).

    A commit may wait ``timeout_minutes`` for the writer, as long as any collective may wait for a rank
    (DeepSpeed's own bound, 300 s, is shorter than a 70B save's last minutes at 2 GB/s). At exit the writer is
    stopped, whatever the path out: it is a non-daemon process waiting on its queue, which the interpreter's
    exit would join forever (multiprocessing's exit handler, registered earlier, runs after this one). A save
    not yet committed (an error cut the run short) is abandoned, its writer killed (it ignores SIGTERM, see
    :func:`signals_held_for_writers`), and its directory is never marked complete; DeepSpeed's cleanup then
    finds the process gone and commits nothing, so no collective runs on one rank.
    """
    if not _decoupled(engine):
        return
    writer = engine.checkpoint_engine
    wait = type(writer)._wait_for_event_with_timeout
    writer._wait_for_event_with_timeout = functools.partial(wait, writer, timeout_seconds=60 * timeout_minutes)

    def stop() -> None:
        if writer.get_commit_info() is not None and writer.ckpt_process is not None:
            writer.ckpt_process.kill()
            writer.ckpt_process.join()
        writer.cleanup()

    atexit.register(stop)


def _decoupled(engine: Any) -> bool:
    """Whether the engine saves through DeepSpeed's decoupled writer processes (``checkpoint.writer``)."""
    writer = getattr(engine, "checkpoint_engine", None)
    return writer is not None and writer.is_decoupled()


def _all_ranks_agree(ok: bool, device: torch.device) -> bool:
    """Whether ``ok`` holds on every rank (one all-reduce; NCCL reduces device tensors only)."""
    if not dist.is_initialized():
        return ok
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
