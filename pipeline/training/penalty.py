"""Parameter-change penalties as a decoupled pull toward the initial weights, on each rank's own partition.

L2-SP: after every optimizer step, p ← p − lr·λ·(p − p₀). EWC: the same with a
per-element importance F (the diagonal Fisher of the replay CE at the initial
weights, normalised to mean 1 so λ means the same as for L2-SP on average):
p ← p − min(lr·λ·F, 1)·(p − p₀). Under ZeRO-3 each rank
holds 1/N of every parameter: the pull reads and writes only that local fp32
partition through DeepSpeed's public ``safe_get/set_local_fp32_param`` and the
local working copy (``ds_tensor``) the next forward gathers, so no rank ever
materialises the full weights and the anchor costs 4 bytes per local element.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_grad, safe_set_local_fp32_param

from cpt_core.errors import UserError
from data_prep.replay import ReplayShard

from ..config import TrainConfig
from ..gere.cache import pad_replay_rows
from ..losses.replay import causal_ce

log = logging.getLogger(__name__)


def _is_zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def local_fp32(p: torch.nn.Parameter) -> torch.Tensor:
    if _is_zero3(p):
        return safe_get_local_fp32_param(p)
    return p.data.float()


def set_local_fp32(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    if _is_zero3(p):
        safe_set_local_fp32_param(p, value)  # the optimizer's fp32 master partition
        p.ds_tensor.data.copy_(value.reshape(p.ds_tensor.shape).to(p.ds_tensor.dtype))  # what forward gathers
    else:
        p.data.copy_(value.to(p.dtype))


def refresh_persistent(params: list[torch.nn.Parameter]) -> None:
    """Rebuild the full copies of ZeRO-3's persistent parameters from their (just pulled) partitions.

    Parameters below ``stage3_param_persistence_threshold`` (norm weights) stay gathered between steps:
    DeepSpeed gathers them at the end of ``engine.step()``, before the pull, and the next forward reads
    that full copy, not the partition. Releasing and gathering them again (one collective, every rank)
    makes the pull land before the next forward; other parameters are gathered from their partitions
    at each forward anyway.
    """
    persistent = [p for p in params if getattr(p, "ds_persist", False)]
    if persistent:
        persistent[0].partition(persistent)  # frees the stale full copies; the partitions hold the pulled values
        persistent[0].all_gather(persistent)


def local_grad(p: torch.nn.Parameter) -> torch.Tensor:
    if _is_zero3(p):
        return safe_get_local_grad(p)
    return p.grad


class AnchorPull:
    """L2-SP (``importance=None``) or EWC (per-element importance over the local partitions)."""

    def __init__(
        self, params: list[torch.nn.Parameter], weight: float, importance: list[torch.Tensor] | None = None
    ) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.weight = weight
        self.anchor = [local_fp32(p).detach().clone() for p in self.params]
        self.importance = importance

    def apply(self, lr: float) -> None:
        with torch.no_grad():
            for k, (p, p0) in enumerate(zip(self.params, self.anchor)):
                local = local_fp32(p)
                if self.importance is None:
                    factor: torch.Tensor | float = min(lr * self.weight, 1.0)  # never past the anchor
                else:
                    factor = (lr * self.weight * self.importance[k]).clamp(max=1.0)
                set_local_fp32(p, local - factor * (local - p0))
            refresh_persistent(self.params)

    def distance(self) -> float:
        """Squared distance of this rank's partitions to the anchor (sum over ranks: the full distance)."""
        with torch.no_grad():
            return float(sum(((local_fp32(p) - p0) ** 2).sum() for p, p0 in zip(self.params, self.anchor)))


def diagonal_fisher(engine, params: list[torch.nn.Parameter], batches, loss_fn) -> list[torch.Tensor]:
    """Mean squared gradient of ``loss_fn`` over ``batches``, on each rank's local partitions, mean 1.

    Uses batch gradients (the empirical Fisher of each batch), averaged over ranks by
    DeepSpeed's reduction. Each backward is forced to be a gradient-accumulation boundary
    so gradients are reduced into the local partitions; zero_grad discards them after reading.
    """
    params = [p for p in params if p.requires_grad]
    fisher = [torch.zeros_like(local_fp32(p)) for p in params]
    engine.set_gradient_accumulation_boundary(True)
    n = 0
    try:
        for batch in batches:
            loss = loss_fn(batch) * engine.gradient_accumulation_steps()  # backward divides by it
            engine.backward(loss)
            for f, p in zip(fisher, params):
                g = local_grad(p)
                if g is not None:
                    f += g.float().reshape(f.shape) ** 2
            engine.optimizer.zero_grad()
            n += 1
    finally:
        engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's own micro-step counting
    total = torch.tensor(
        [float(sum(f.sum() for f in fisher)), float(sum(f.numel() for f in fisher))],
        dtype=torch.float64,
        device=engine.device,
    )  # NCCL reduces device tensors only
    if dist.is_initialized():
        dist.all_reduce(total)
    mean = float(total[0] / total[1]) / max(n, 1)
    if not mean > 0:
        raise UserError("EWC: the Fisher estimate is zero (no replay gradient reached the parameters)")
    return [f / max(n, 1) / mean for f in fisher]


def build_anchor_pull(
    cfg: TrainConfig, engine: Any, replay_dir: Path | None, world: int, rank: int
) -> AnchorPull | None:
    """The configured penalty, anchored at the engine's current (start) weights: call before any resume."""
    kind, params = cfg.penalty.kind, list(engine.module.parameters())
    if kind == "none":
        return None
    if kind == "l2sp":
        return AnchorPull(params, cfg.penalty.weight)
    if replay_dir is None:
        raise UserError("penalty.kind 'ewc' estimates its Fisher on the replay shard; prep.json has none")
    replay = ReplayShard.open(replay_dir)
    rows, per = replay.rows(), cfg.batch.micro_batch

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in range(cfg.penalty.ewc_batches):
            start = ((b * world + rank) * per) % len(rows)
            ids, mask = pad_replay_rows(rows[start : start + per]["input_ids"], replay.replay_len)
            yield ids.to(engine.device), mask.to(engine.device)

    def loss(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, mask = batch
        return causal_ce(engine(input_ids=ids, attention_mask=mask, use_cache=False).logits, ids, mask)

    fisher = diagonal_fisher(engine, params, batches(), loss)
    peak = max(float(f.max()) for f in fisher if f.numel())
    log.info(
        "EWC: diagonal Fisher from %d replay batches; largest importance %.1fx the mean", cfg.penalty.ewc_batches, peak
    )
    return AnchorPull(params, cfg.penalty.weight, fisher)
