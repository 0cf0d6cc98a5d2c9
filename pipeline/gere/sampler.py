"""Which replay samples go into each step: a seeded permutation that restarts every pass.

The paper interleaves replay into every batch. Each pass over the replay set
is its own permutation (seed, pass), so every sample is used exactly once per
pass; ``state_dict`` is two integers and resuming continues the same sequence.
"""

from __future__ import annotations

import numpy as np

from data_prep.errors import UserError


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
