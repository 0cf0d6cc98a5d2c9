"""The GeRe cache: the frozen base model's view of the replay set, in 2 bits per element.

Built once before training: thresholds (fp32 [H] mean and std of the final
hidden states over every real replay token) and each element's state,
memory-mapped as ``states.u8`` [N, replay_len, ceil(H/4)] — 1/16 of the fp32
activations the reference implementation stores. Two passes over the replay
set (statistics, then states) avoid holding any activations. Ranks split the
samples; under ZeRO-3 every rank must run the same number of forwards (each
forward gathers parameters collectively), so short ranks run padding batches
and discard them.

``meta.json`` carries the base model's and tokenizer's fingerprints: a cache
is refused for any other model or tokenizer.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from cpt_core.errors import UserError
from data_prep.replay import ReplayShard

from .states import activation_states, pack_states, packed_width
from .thresholds import MomentAccumulator, Thresholds

STATES_FILE = "states.u8"  # [N, replay_len, ceil(H/4)] uint8: 4 two-bit states per byte

log = logging.getLogger(__name__)

HiddenFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
FORMAT_VERSION = 2  # 2: the 2-bit states file is states.u8


class CacheMismatch(UserError):
    """The cache was built for another model, tokenizer or replay set."""


def pad_replay_rows(
    rows: Sequence[Sequence[int]], replay_len: int, pad_id: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replay samples → ([B, replay_len] ids, mask). Always the full length, so the forward
    in training has the same shapes as when the cache was built: same numbers, TM exactly 0."""
    ids = torch.full((len(rows), replay_len), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), replay_len), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > replay_len:
            raise UserError(f"replay sample {i} has {len(r)} tokens > replay_len {replay_len}")
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


@dataclass
class GeReCache:
    """A built cache, opened for training: thresholds on ``device`` and memory-mapped states."""

    directory: Path
    meta: dict[str, Any]
    thresholds: Thresholds
    packed_states: np.ndarray  # [N, replay_len, ceil(H/4)] uint8, memory-mapped
    feature_map: np.ndarray | None = None  # [N, replay_len, H] bf16 bits as uint16, when built with features

    @classmethod
    def open(
        cls,
        directory: str | Path,
        model_fingerprint: str,
        tokenizer_fingerprint: str,
        device: torch.device | str = "cpu",
    ) -> GeReCache:
        directory = Path(directory)
        meta_path = directory / "meta.json"
        if not meta_path.is_file():
            raise CacheMismatch(f"{directory}: not a GeRe cache (no meta.json); build it with pipeline.gere")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT_VERSION:
            raise CacheMismatch(
                f"{directory}: cache format {meta.get('format')}, this version reads {FORMAT_VERSION}; rebuild it with "
                "pipeline.gere"
            )
        for what, expected in (("model", model_fingerprint), ("tokenizer", tokenizer_fingerprint)):
            if meta[f"{what}_fingerprint"] != expected:
                raise CacheMismatch(
                    f"{directory}: built for another {what} ({meta[f'{what}_fingerprint']}, "
                    f"this run uses {expected}); rebuild the cache for this {what}"
                )
        t = load_file(str(directory / "thresholds.safetensors"), device=str(device))
        packed = np.memmap(
            directory / STATES_FILE,
            dtype=np.uint8,
            mode="r",
            shape=(meta["num_samples"], meta["replay_len"], packed_width(meta["hidden_size"])),
        )
        features = None
        if meta.get("features"):
            features = np.memmap(
                directory / "features.bf16",
                dtype=np.uint16,
                mode="r",
                shape=(meta["num_samples"], meta["replay_len"], meta["hidden_size"]),
            )
        return cls(directory, meta, Thresholds(t["mean"], t["std"]), packed, features)

    def check_shard(self, shard: ReplayShard, rows: Any) -> None:
        """Refuse a cache built for other replay samples: states are looked up by row index."""
        ids, length = list(rows["id"]), shard.replay_len
        if self.meta["replay_len"] != length or self.meta["ids"] != ids:
            raise CacheMismatch(
                f"{self.directory}: built for another replay shard ({self.meta['num_samples']} samples of "
                f"{self.meta['replay_len']} tokens; {shard.directory} has {len(ids)} of {length}"
                f"{', other documents' if len(ids) == self.meta['num_samples'] else ''}); rebuild the cache"
            )

    def states(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Packed states of replay samples ``indices``: [B, replay_len, ceil(H/4)] uint8."""
        return torch.from_numpy(np.ascontiguousarray(self.packed_states[np.asarray(indices)])).to(device)

    def features(self, indices: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        """Cached reference hidden states (bf16) of replay samples ``indices``, for L1/L2 imitation."""
        if self.feature_map is None:
            raise UserError(f"{self.directory}: built without features; rebuild with --features for l1/l2 replay")
        bits = np.ascontiguousarray(self.feature_map[np.asarray(indices)]).view(np.int16)
        return torch.from_numpy(bits).view(torch.bfloat16).to(device)


def build_cache(
    hidden_fn: HiddenFn,
    samples: Sequence[Sequence[int]],
    ids: Sequence[str],
    out_dir: str | Path,
    *,
    hidden_size: int,
    replay_len: int,
    batch_size: int,
    model_fingerprint: str,
    tokenizer_fingerprint: str,
    device: torch.device | str = "cpu",
    features: bool = False,
    built_with: dict[str, Any] | None = None,
) -> Path:
    """Run the frozen model over the replay samples and write the cache (atomically, by rank 0).

    ``built_with`` (dtype, attention, batch size) is recorded so training can tell whether its replay
    forward reproduces the cached states exactly.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    out_dir = Path(out_dir)
    building = out_dir.with_name(out_dir.name + ".building")
    mine = list(range(rank, len(samples), world))
    steps = math.ceil(math.ceil(len(samples) / world) / batch_size)

    def batches():
        for s in range(steps):
            chunk = mine[s * batch_size : (s + 1) * batch_size]
            real = len(chunk)
            chunk = chunk or [0]  # padding batch: keeps ZeRO-3 collectives in step, result discarded
            ids_, mask = pad_replay_rows([samples[i] for i in chunk], replay_len)
            yield chunk[:real], ids_.to(device), mask.to(device)

    with torch.no_grad():
        moments = MomentAccumulator(hidden_size, device=device)
        for chunk, input_ids, mask in batches():
            h = hidden_fn(input_ids, mask)
            if chunk:
                moments.add(h[: len(chunk)], mask[: len(chunk)])
        thresholds = moments.finish()
        if rank == 0:
            shutil.rmtree(building, ignore_errors=True)
            building.mkdir(parents=True)
            np.memmap(
                building / STATES_FILE,
                dtype=np.uint8,
                mode="w+",
                shape=(len(samples), replay_len, packed_width(hidden_size)),
            ).flush()
            if features:
                np.memmap(
                    building / "features.bf16",
                    dtype=np.uint16,
                    mode="w+",
                    shape=(len(samples), replay_len, hidden_size),
                ).flush()
        _barrier()
        packed = np.memmap(
            building / STATES_FILE,
            dtype=np.uint8,
            mode="r+",
            shape=(len(samples), replay_len, packed_width(hidden_size)),
        )
        feature_map = (
            np.memmap(
                building / "features.bf16", dtype=np.uint16, mode="r+", shape=(len(samples), replay_len, hidden_size)
            )
            if features
            else None
        )
        for chunk, input_ids, mask in batches():
            h = hidden_fn(input_ids, mask)
            if chunk:
                states = activation_states(h[: len(chunk)], thresholds.neg, thresholds.pos)
                states[mask[: len(chunk)] == 0] = 0  # padding positions: neutral, and masked out anyway
                packed[np.asarray(chunk)] = pack_states(states).cpu().numpy()
                if feature_map is not None:
                    bits = h[: len(chunk)].to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16)
                    feature_map[np.asarray(chunk)] = bits
        packed.flush()
        if feature_map is not None:
            feature_map.flush()
        del packed, feature_map
    _barrier()
    if rank == 0:
        save_file(
            {"mean": thresholds.mean.cpu().contiguous(), "std": thresholds.std.cpu().contiguous()},
            str(building / "thresholds.safetensors"),
        )
        meta = {
            "format": FORMAT_VERSION,
            "num_samples": len(samples),
            "replay_len": replay_len,
            "hidden_size": hidden_size,
            "ids": list(ids),
            "lengths": [len(s) for s in samples],
            "tokens": int(sum(len(s) for s in samples)),
            "model_fingerprint": model_fingerprint,
            "tokenizer_fingerprint": tokenizer_fingerprint,
            "world_size": world,
            "features": features,
            "built_with": {**(built_with or {}), "batch_size": batch_size},
            "states_bytes": len(samples) * replay_len * packed_width(hidden_size),
            "fp32_activation_bytes": len(samples) * replay_len * hidden_size * 4,
        }
        (building / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        building.rename(out_dir)
        log.info(
            "GeRe cache: %d samples, %d tokens, states %.1f MB (fp32 activations would be %.1f MB) → %s",
            len(samples),
            meta["tokens"],
            meta["states_bytes"] / 2**20,
            meta["fp32_activation_bytes"] / 2**20,
            out_dir,
        )
    _barrier()
    return out_dir


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
