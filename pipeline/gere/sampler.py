"""Which replay samples go into each step, and to which rank and micro-batch.

A seeded permutation that restarts every pass (the paper interleaves replay
into every batch). Each pass over the replay set is its own permutation (seed,
pass), so every sample is used exactly once per pass; ``state_dict`` is two
integers and resuming continues the same sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cpt_core.errors import UserError


class ReplaySampler:
    def __init__(self, num_samples: int, per_step: int, seed: int = 0) -> None:
        if num_samples < 1 or per_step < 1:
            raise UserError(f"replay needs num_samples >= 1 and per_step >= 1, got {num_samples}, {per_step}")
        self.num_samples, self.per_step, self.seed = num_samples, per_step, seed
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def next_indices(self) -> list[int]:
        out: list[int] = []
        while len(out) < self.per_step:
            if self.position == self.num_samples:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.per_step - len(out), self.num_samples - self.position)
            out.extend(self._order[self.position : self.position + take].tolist())
            self.position += take
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["num_samples"] != self.num_samples:
            raise UserError(
                f"replay sampler state is for seed {state['seed']} / {state['num_samples']} samples, "
                f"this run has seed {self.seed} / {self.num_samples}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)


def replay_plan(samples_per_step: int, world: int, grad_accum: int) -> tuple[int, int]:
    """(replay rows per forward, micro-batches per step that have replay) for ``samples_per_step`` samples.

    Every rank runs the same forwards of the same shape (a replay forward under ZeRO-3 gathers parameters
    collectively, and the GeRe cache is built in forwards of this size). A rank's share, ceil(samples /
    ranks), goes into as few rows per forward as fit in grad_accum micro-batches, in as many micro-batches
    as that takes; slots the samples do not fill (ranks x active x rows can pass the count: 10 samples on
    2 ranks with grad_accum 4 run 3 forwards of 2 rows a rank) are padding rows that weigh nothing.
    """
    per_rank = -(-samples_per_step // world)
    rows = -(-per_rank // grad_accum)  # ceil: at most grad_accum forwards
    return rows, -(-per_rank // rows)


@dataclass(frozen=True)
class ReplayChunk:
    """One rank's replay rows in one micro-batch: ``rows`` sample indices, of which the first ``real`` are the
    step's samples and the rest copies that fill the forward to its shape and weigh 0 in the loss.

    ``share`` weighs the chunk's replay terms (each a mean over its real tokens): grad_accum x ranks x real /
    samples, so that after DeepSpeed's mean over ranks and micro-batches the gradient is the mean over the
    step's samples. With every chunk full this is grad_accum / (micro-batches with replay), the same float
    (both are correctly rounded quotients of the same rational).
    """

    rows: list[int]
    real: int
    share: float


def replay_slots(drawn: list[int], world: int, grad_accum: int, rank: int) -> list[ReplayChunk | None]:
    """``rank``'s chunks of a step's replay samples for each of its micro-batches (None: none in that one).

    The micro-batches with replay are spread over the step and are the same on every rank; the i-th of
    them on rank r takes slot i·world + r, the same interleaving as the task rows. A slot the samples do
    not fill is padded with copies of the step's first sample (a real row, so the forward stays finite).
    """
    rows, active = replay_plan(len(drawn), world, grad_accum)
    out: list[ReplayChunk | None] = [None] * grad_accum
    for i in range(active):
        slot = i * world + rank
        real = drawn[slot * rows : (slot + 1) * rows]
        share = grad_accum * world * len(real) / len(drawn)
        out[i * grad_accum // active] = ReplayChunk(real + [drawn[0]] * (rows - len(real)), len(real), share)
    return out
