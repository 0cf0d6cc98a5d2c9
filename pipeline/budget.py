"""The forgetting budget: hold the rise of general perplexity under what the user allows, and no lower.

Every ``forgetting.every`` steps all ranks score the prep's probe documents
(general text no split shares: not trained on, replayed or in the holdout the
report scores), each alone, its first ``seq_len`` tokens, and compare the
probe perplexity with its value before the first step:

    rise = ppl / ppl_0 − 1
    s ← clamp(s · exp(gain · (rise − budget) / budget), min_scale, max_scale)

``s`` multiplies the replay term's weight and the KD weight (the objective's
``anti_forgetting_scale``). Above the budget ``s`` grows; below it ``s``
shrinks, handing the domain what the budget allows. Integral action only: the
rise moves slowly and is measured rarely, so a proportional term would only
echo the last measurement's noise. The probe loss is an all-reduced sum, so
every rank computes the same ``s``; the state (``s``, ``ppl_0``, the last
rise) is part of the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import torch

from .config import ForgettingConfig
from .perplexity import perplexity

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]  # [1, L] ids → [1, L, V] logits


def next_scale(scale: float, rise: float, cfg: ForgettingConfig) -> float:
    """One controller update (see the module docstring)."""
    assert cfg.budget is not None
    return min(max(scale * math.exp(cfg.gain * (rise - cfg.budget) / cfg.budget), cfg.min_scale), cfg.max_scale)


class ForgettingBudget:
    def __init__(self, cfg: ForgettingConfig, probe: Any, seq_len: int, device: torch.device) -> None:
        """``probe``: a dataset of documents (``input_ids``, ``loss_mask``), PREP/probe."""
        rows = probe.select(range(min(cfg.probe_docs, len(probe))))
        self.cfg, self.seq_len, self.device = cfg, seq_len, device
        self.docs, self.masks = rows["input_ids"], rows["loss_mask"]
        self.scale, self.base_ppl, self.rise = 1.0, None, 0.0

    def probe_ppl(self, forward: Forward) -> float:
        return perplexity(forward, self.docs, self.masks, self.seq_len, self.device, whole_documents=False)["ppl"]

    def start(self, forward: Forward) -> None:
        """Measure the probe before the first step (a resumed run restores it instead)."""
        self.base_ppl = self.probe_ppl(forward)
        log.info("forgetting budget %.3g: probe ppl %.3f before training", self.cfg.budget, self.base_ppl)

    def update(self, forward: Forward) -> dict[str, float]:
        """Measure, move the scale; returns what to log."""
        self.rise = self.probe_ppl(forward) / self.base_ppl - 1.0
        self.scale = next_scale(self.scale, self.rise, self.cfg)
        return {"forgetting/probe_rise": self.rise, "forgetting/scale": self.scale}

    def state_dict(self) -> dict[str, float | None]:
        return {"scale": self.scale, "base_ppl": self.base_ppl, "rise": self.rise}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.scale, self.base_ppl, self.rise = state["scale"], state["base_ppl"], state["rise"]
