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

import hashlib
import logging
import math
from typing import Any

import torch

from data_prep.errors import ConfigError

from .config import ForgettingConfig
from .perplexity import Forward, perplexity

log = logging.getLogger(__name__)


def next_scale(scale: float, rise: float, cfg: ForgettingConfig) -> float:
    """One controller update (see the module docstring). A rise that is not finite (the probe loss diverged)
    sends the scale to its ceiling; the exponent is bounded, so a huge rise cannot overflow."""
    assert cfg.budget is not None
    if not math.isfinite(rise):
        return cfg.max_scale
    step = min(max(cfg.gain * (rise - cfg.budget) / cfg.budget, -50.0), 50.0)
    return min(max(scale * math.exp(step), cfg.min_scale), cfg.max_scale)


class ForgettingBudget:
    def __init__(self, cfg: ForgettingConfig, probe: Any, seq_len: int, device: torch.device) -> None:
        """``probe``: a dataset of documents (``input_ids``, ``loss_mask``), PREP/probe."""
        rows = probe.select(range(min(cfg.probe_docs, len(probe))))
        self.cfg, self.seq_len, self.device = cfg, seq_len, device
        self.docs, self.masks = rows["input_ids"], rows["loss_mask"]
        self.probe = hashlib.sha256("\n".join(rows["id"]).encode()).hexdigest()[:16]  # which documents
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

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "base_ppl": self.base_ppl, "rise": self.rise, "probe": self.probe}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue a checkpoint's controller; refused when its baseline was measured on other documents."""
        if state is None:
            raise ConfigError(
                "forgetting.budget is set but the checkpoint has no forgetting-budget state: its probe baseline "
                "would be measured on already-trained weights; resume with the budget off or start a new run"
            )
        if state["probe"] != self.probe:
            raise ConfigError(
                "the checkpoint's forgetting budget measured other probe documents (forgetting.probe_docs or the "
                "prep changed); its baseline does not apply"
            )
        self.scale, self.base_ppl, self.rise = state["scale"], state["base_ppl"], state["rise"]
