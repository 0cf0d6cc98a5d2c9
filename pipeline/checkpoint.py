"""Checkpoints that are either complete or ignored, and resume that continues exactly.

A checkpoint is DeepSpeed's own (weights, optimizer and scheduler, each rank's
partition) plus our state: step, tokens seen, replay sampler, config, and
every rank's RNG state (safetensors, no pickle). Only once every rank has
written does rank 0 drop a ``COMPLETE`` marker into the tag directory and
atomically point ``latest`` at it. Resume takes ``latest``; directories
without the marker (a kill mid-save) are never taken and are removed.
DeepSpeed reads its own files with torch.load: only resume from checkpoints
this pipeline wrote.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
LATEST = "latest"


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int, world: int) -> None:
        self.root, self.keep_last, self.rank, self.world = Path(root), keep_last, rank, world

    def save(self, engine: Any, step: int, state: dict[str, Any]) -> Path:
        tag = f"step{step:08d}"
        engine.save_checkpoint(str(self.root), tag=tag, client_state={"pipeline": state}, save_latest=False)
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        save_file(rng, str(self.root / tag / f"rng_rank{self.rank:05d}.safetensors"))
        _barrier()
        if self.rank == 0:
            (self.root / tag / "pipeline_state.json").write_text(json.dumps(state, indent=1, sort_keys=True))
            (self.root / tag / COMPLETE).write_text(f"{self.world}\n")
            tmp = self.root / f".{LATEST}.tmp"
            tmp.write_text(tag + "\n")
            os.replace(tmp, self.root / LATEST)
            self._purge(keep=tag)
            log.info("checkpoint: step %d → %s", step, self.root / tag)
        _barrier()
        return self.root / tag

    def resolve(self, resume: str) -> tuple[Path, str] | None:
        """The checkpoint to resume from: (root, tag), or None to start fresh."""
        if resume == "never":
            return None
        if resume != "auto":
            path = Path(resume)
            if not (path / COMPLETE).is_file():
                raise ValueError(f"{path}: not a complete checkpoint (no {COMPLETE} marker)")
            return path.parent, path.name
        latest = self.root / LATEST
        if not latest.is_file():
            return None
        tag = latest.read_text().strip()
        if not (self.root / tag / COMPLETE).is_file():
            raise ValueError(f"{latest} points at {tag}, which is incomplete; pass checkpoint.resume=<dir>")
        return self.root, tag

    def saved_world(self, root: Path, tag: str) -> int:
        return json.loads((root / tag / "pipeline_state.json").read_text())["world"]

    def to_universal(self, root: Path, tag: str) -> str:
        """Convert a checkpoint once to DeepSpeed's universal format, which loads on any number of ranks."""
        target = f"{tag}_universal"
        if self.rank == 0 and not (root / target / COMPLETE).is_file():
            log.info("checkpoint %s was written by another number of ranks: converting it to %s", tag, target)
            shutil.rmtree(root / target, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                            str(root / tag), "--output_folder", str(root / target)], check=True,
                           stdout=subprocess.DEVNULL)
            shutil.copy2(root / tag / "pipeline_state.json", root / target / "pipeline_state.json")
            (root / target / COMPLETE).write_text("universal\n")
        _barrier()
        return target

    def load(self, engine: Any, root: Path, tag: str) -> dict[str, Any]:
        _, client = engine.load_checkpoint(str(root), tag=tag, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
        if client is None:
            raise ValueError(f"{root / tag}: DeepSpeed could not load this checkpoint")
        rng_path = root / tag / f"rng_rank{self.rank:05d}.safetensors"
        if rng_path.is_file():  # absent in a universal checkpoint: RNG states are per rank
            rng = load_file(str(rng_path))
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        log.info("resumed from %s", root / tag)
        return client["pipeline"]

    def _purge(self, keep: str) -> None:
        tags = sorted(p for p in self.root.glob("step*") if p.is_dir() and not p.name.endswith("_universal"))
        complete = [p for p in tags if (p / COMPLETE).is_file()]
        for p in tags:
            if not (p / COMPLETE).is_file() and p.name != keep:
                shutil.rmtree(p, ignore_errors=True)  # a save that was killed half-way
        for p in complete[:-self.keep_last]:
            if p.name != keep:
                shutil.rmtree(p, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
