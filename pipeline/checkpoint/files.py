"""A checkpoint's files, checked before anything unpickles them: all there, intact, tensors only.

DeepSpeed reads its checkpoint files with ``torch.load(weights_only=False)``,
which runs whatever a pickle names. So before resume, universal conversion or
export hands a checkpoint to DeepSpeed, every file in it is checked here:

- it is in the ``COMPLETE`` manifest, with the recorded size (missing, truncated);
- each zip entry matches its CRC-32 (bit rot, a partial overwrite);
- it loads with torch's weights-only unpickler, which allows tensors,
  containers and DeepSpeed's own three small types and nothing else, so no
  code a file names can run.

Under N ranks each rank checks every N-th file and all ranks agree on the
verdict, so a resume reads each file once more in total.
"""

from __future__ import annotations

import enum
import json
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from cpt_core.errors import UserError

CHECKPOINTS = "checkpoints"  # under a run directory: the checkpoint root
LATEST = "latest"  # in the checkpoint root: the tag of the newest complete checkpoint
UNIVERSAL = "_universal"  # tag suffix of a conversion to DeepSpeed's universal format
COMPLETE = "COMPLETE"  # in a tag directory, written last: every file and its size
STATE = "pipeline_state.json"  # in a tag directory: step, tokens seen, sampler state, world, config


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint, RUN/checkpoints/<tag>/: DeepSpeed's files, per-rank RNG, ``STATE``, and ``COMPLETE`` last.

    The one place that knows the layout; everything else asks this type.
    """

    path: Path

    @classmethod
    def for_step(cls, root: str | Path, step: int) -> CheckpointDir:
        return cls(Path(root) / f"step{step:08d}")

    @classmethod
    def latest(cls, root: str | Path) -> CheckpointDir | None:
        """The checkpoint ``root/latest`` names, or None before the first save."""
        tag = latest_tag(root)
        return cls(Path(root) / tag) if tag else None

    @classmethod
    def latest_of_run(cls, run_dir: str | Path) -> CheckpointDir:
        found = cls.latest(checkpoint_root(run_dir))
        if found is None:
            raise UserError(f"{run_dir}: no checkpoint yet ({checkpoint_root(run_dir) / LATEST} is missing)")
        return found

    @classmethod
    def saved(cls, root: str | Path) -> list[CheckpointDir]:
        """Every step checkpoint under ``root`` (complete or not; conversions left out), oldest first."""
        found = sorted(p for p in Path(root).glob("step*") if p.is_dir() and not p.name.endswith(UNIVERSAL))
        return [cls(p) for p in found]

    def universal(self, root: str | Path) -> CheckpointDir:
        """Where this checkpoint's universal conversion goes under ``root``."""
        return CheckpointDir(Path(root) / f"{self.tag}{UNIVERSAL}")

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name

    def is_complete(self) -> bool:
        return (self.path / COMPLETE).is_file()

    def is_pipeline_checkpoint(self) -> bool:
        return self.is_complete() and (self.path / STATE).is_file()

    def state(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / STATE).read_text())
        except FileNotFoundError:
            raise UserError(f"{self.path}: not a pipeline checkpoint (no {STATE})") from None

    def write_state(self, state: dict[str, Any]) -> None:
        (self.path / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))

    def rng_file(self, rank: int) -> Path:
        return self.path / f"rng_rank{rank:05d}.safetensors"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def latest_tag(root: str | Path) -> str | None:
    pointer = Path(root) / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def point_latest(root: str | Path, tag: str | None) -> None:
    """Atomically point ``root/latest`` at ``tag`` (None removes the pointer)."""
    pointer = Path(root) / LATEST
    if tag is None:
        pointer.unlink(missing_ok=True)
        return
    tmp = Path(root) / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, pointer)


def write_complete(tag_dir: Path, **info: Any) -> None:
    """Mark ``tag_dir`` complete: ``info`` plus every file's size, written atomically, last."""
    files = {
        p.relative_to(tag_dir).as_posix(): p.stat().st_size
        for p in sorted(tag_dir.rglob("*"))
        if p.is_file() and p.name != COMPLETE
    }
    tmp = tag_dir / f".{COMPLETE}.tmp"
    tmp.write_text(json.dumps({**info, "files": files}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, tag_dir / COMPLETE)


def read_complete(tag_dir: Path) -> dict[str, Any]:
    try:
        info = json.loads((tag_dir / COMPLETE).read_text())
    except FileNotFoundError:
        raise UserError(f"{tag_dir}: not a complete checkpoint (no {COMPLETE} marker)") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UserError(f"{tag_dir / COMPLETE}: unreadable (not written by this pipeline?)") from None
    if not isinstance(info, dict) or not isinstance(info.get("files"), dict):
        raise UserError(f"{tag_dir / COMPLETE}: no file list (written by an older version?)")
    return info


def _deepspeed_types() -> list[Any]:
    """The non-tensor types DeepSpeed pickles into its optimizer states, and how its enum arrives.

    Some Python versions (3.11.2, Debian 12's) pickle an enum member by name, as
    ``getattr(EnumClass, "name")``; others (3.11.7) as ``EnumClass(value)``. ``getattr`` itself would
    let a pickle reach any attribute of an allowed class, so :func:`_enum_member`
    stands in for it and answers only for members of DeepSpeed's enum.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # deepspeed: only when checking
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, (_enum_member, "builtins.getattr")]


def deepspeed_safe_globals() -> Any:
    """A context in which torch's weights-only unpickler accepts DeepSpeed's own small types: checks load files
    in it, and so does resuming through DeepSpeed's decoupled checkpoint engine, whose ``load`` leaves torch's
    default (weights only) in force where its synchronous engine unpickles anything."""
    return torch.serialization.safe_globals(_deepspeed_types())


def _enum_member(cls: Any, name: Any) -> enum.Enum:
    """``getattr(cls, name)`` as an enum pickle uses it, for ZeroStageEnum's members and nothing else."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    if cls is not ZeroStageEnum or not isinstance(name, str) or name not in cls.__members__:
        raise pickle.UnpicklingError(f"getattr({cls!r}, {name!r}) is not a member of an allowed enum")
    return cls[name]


def file_problem(path: Path, size: int) -> str | None:
    """What is wrong with one checkpoint file, or None."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != size:
        return f"{path.stat().st_size} bytes, {size} when it was written (truncated or overwritten)"
    if path.suffix != ".pt":
        return None  # json, safetensors: read by parsers that run no code
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        return f"not a readable torch file ({e})"
    if bad is not None:
        return f"corrupt: CRC mismatch in {bad}"
    try:
        with deepspeed_safe_globals():
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - any refusal of the weights-only unpickler
        return f"refused by the weights-only loader: {_unpickler_reason(e)}"
    return None


def _unpickler_reason(error: Exception) -> str:
    """The one line of torch's long weights-only message that says what the file asked for."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return next(
        (line for line in lines if "GLOBAL" in line or "Unsupported" in line),
        lines[0] if lines else type(error).__name__,
    )


def verify_checkpoint(tag_dir: Path, rank: int = 0, world: int = 1) -> None:
    """Raise UserError naming the first bad file of ``tag_dir``; all ranks raise together."""
    files = sorted(read_complete(tag_dir)["files"].items())
    first_bad, problem = len(files), None
    for index in range(rank, len(files), world):
        problem = file_problem(tag_dir / files[index][0], files[index][1])
        if problem is not None:
            first_bad = index
            break
    if world > 1 and dist.is_initialized():
        verdict = torch.tensor([first_bad], device=_collective_device())
        dist.all_reduce(verdict, op=dist.ReduceOp.MIN)
        if int(verdict.item()) != first_bad:
            first_bad, problem = int(verdict.item()), f"see rank {int(verdict.item()) % world}'s check"
    if first_bad < len(files):
        raise UserError(
            f"{tag_dir / files[first_bad][0]}: {problem}. Resume from an earlier checkpoint "
            f"with checkpoint.resume=<dir>, or checkpoint.resume=never"
        )


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
