"""Per-dimension mean and std of the reference activations, accumulated in float64.

Ranks each see part of the replay set; they all-reduce (count, sum, sum of
squares), so the thresholds do not depend on how the set was split, up to the
order of float64 additions (~1e-16 relative). std is the population std.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from cpt_core.errors import UserError


@dataclass
class Thresholds:
    mean: torch.Tensor  # [H] float32
    std: torch.Tensor  # [H] float32

    @property
    def neg(self) -> torch.Tensor:
        return self.mean - self.std

    @property
    def pos(self) -> torch.Tensor:
        return self.mean + self.std


class MomentAccumulator:
    """Running float64 sums over real tokens; ``finish`` all-reduces when a process group is up."""

    def __init__(self, hidden: int, device: torch.device | str = "cpu") -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(hidden, dtype=torch.float64, device=device)
        self.squares = torch.zeros(hidden, dtype=torch.float64, device=device)

    def add(self, h: torch.Tensor, mask: torch.Tensor) -> None:
        """``h`` [..., H], ``mask`` [...] with 1 on real tokens."""
        x = h.reshape(-1, h.shape[-1])[mask.reshape(-1).bool()].double()
        self.count += x.shape[0]
        self.total += x.sum(0)
        self.squares += (x * x).sum(0)

    def finish(self) -> Thresholds:
        if dist.is_available() and dist.is_initialized():
            packed = torch.cat([self.count.view(1), self.total, self.squares])
            dist.all_reduce(packed)
            self.count, self.total, self.squares = (
                packed[0],
                packed[1 : 1 + len(self.total)],
                packed[1 + len(self.total) :],
            )
        if self.count <= 0:
            raise UserError("no real tokens were seen; the replay set is empty")
        mean = self.total / self.count
        var = (self.squares / self.count - mean * mean).clamp_min(0.0)
        return Thresholds(mean.float(), var.sqrt().float())
