"""The forgetting budget: hold the rise of general perplexity under what the user allows, and no lower.

Every ``forgetting.every`` steps all ranks score the prep's probe documents (general text in no
other split), each whole, and compare the probe perplexity with its value before the first step.
A level ``u`` integrates the relative error of the rise (optionally projected ahead while it
climbs, plus ``margin`` standard errors over documents) and the levers read it plus a proportional
term:

    e = (projected rise − budget) / budget,   u ← clamp(u + gain · e),   level = clamp(u + proportional · e)

Up to ``log max_scale`` the level is the log of the scale on the anti-forgetting weights (replay
CE, the replay term, KD); beyond it the lr is braked, down to ``min_lr_scale``: at a high lr Adam's
step has the lr's size whatever the loss weights. With ``watch`` and no budget the rise is only
logged and both levers read exactly 1. The probe loss is all-reduced, so every rank computes the
same level; the controller's state is in the checkpoint, so a resumed run continues exactly. How
each option behaved on the bench: docs/forgetting-budget.md.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch

from cpt_core.errors import ConfigError

from ..config import ForgettingConfig
from ..evaluation.perplexity import Forward, document_losses, perplexity_change, perplexity_of

log = logging.getLogger(__name__)


def relative_error(rise: float, previous: float, cfg: ForgettingConfig, rise_se: float = 0.0) -> float:
    """(projected rise − budget) / budget from the rise just measured, its standard error over the probe's
    documents and the rise before it (0 at the first update: the baseline); see the module docstring. +inf when
    the rise is not finite (the probe loss diverged)."""
    assert cfg.budget is not None
    # One-sided (see the module docstring); a previous rise that was not finite has no slope to project.
    climb = rise - previous if cfg.lookahead > 0 and math.isfinite(previous) else 0.0
    # margin: hold the rise's upper estimate, so that other documents than the probe's stay under the budget too
    # (one probe document has no error: nan, taken as 0)
    upper = cfg.margin * rise_se if cfg.margin and math.isfinite(rise_se) else 0.0
    projected = rise + cfg.lookahead * max(climb, 0.0) + upper
    return (projected - cfg.budget) / cfg.budget if math.isfinite(projected) else math.inf


def bounded(step: float) -> float:
    """A level step of at most 50 either way: a huge rise moves it to a bound without overflowing exp."""
    return min(max(step, -50.0), 50.0)


def next_level(level: float, rise: float, previous: float, cfg: ForgettingConfig, rise_se: float = 0.0) -> float:
    """One update of the integral ``u`` (see the module docstring). A rise that is not finite sends it to its
    ceiling."""
    error = relative_error(rise, previous, cfg, rise_se)
    if not math.isfinite(error):
        return level_bounds(cfg)[1]
    return clamp_level(level + bounded(cfg.gain * error), cfg)


def proportional_step(rise: float, previous: float, cfg: ForgettingConfig, rise_se: float = 0.0) -> float:
    """The proportional term, ``proportional · error`` (times ``release`` under the budget), added to the integral
    until the next update."""
    if not cfg.proportional:
        return 0.0
    error = relative_error(rise, previous, cfg, rise_se)
    return bounded(cfg.proportional * error * (cfg.release if error < 0 else 1.0))


def level_bounds(cfg: ForgettingConfig) -> tuple[float, float]:
    """``u`` runs from log min_scale (weights at their floor) to log max_scale − log min_lr_scale (full brake)."""
    return math.log(cfg.min_scale), math.log(cfg.max_scale) - math.log(cfg.min_lr_scale)


def clamp_level(level: float, cfg: ForgettingConfig) -> float:
    low, high = level_bounds(cfg)
    return min(max(level, low), high)


def levers(level: float, cfg: ForgettingConfig) -> tuple[float, float]:
    """(scale on the anti-forgetting weights, multiplier on the learning rate) at level ``u``."""
    top = math.log(cfg.max_scale)
    return math.exp(min(level, top)), math.exp(min(top - level, 0.0))


STATE_VERSION = 1  # of the controller's state in a checkpoint; another version is refused


class ForgettingBudget:
    def __init__(self, cfg: ForgettingConfig, probe: Any, seq_len: int, device: torch.device) -> None:
        """``probe``: a dataset of documents (``input_ids``, ``loss_mask``), PREP/probe."""
        rows = probe.select(range(min(cfg.probe_docs, len(probe))))
        self.cfg, self.seq_len, self.device = cfg, seq_len, device
        self.docs, self.masks = rows["input_ids"], rows["loss_mask"]
        self.probe = hashlib.sha256("\n".join(rows["id"]).encode()).hexdigest()[:16]  # which documents
        self.controls = cfg.budget is not None  # else watch: measure and log only, both levers read 1
        self.level = level_bounds(cfg)[1] if cfg.cautious_start and self.controls else 0.0  # the integral
        self.push = 0.0  # the proportional term: 0 until a probe has measured an error
        self.base_ppl, self.rise = None, 0.0
        self.base_docs: torch.Tensor | None = None  # [documents, 2] (NLL, tokens) before the first step

    @property
    def effective_level(self) -> float:
        """What the levers read: the integral plus the proportional term, within the level's bounds."""
        return clamp_level(self.level + self.push, self.cfg)

    @property
    def scale(self) -> float:
        """The scale on the anti-forgetting weights; exactly 1 while watching, whatever the other settings."""
        return levers(self.effective_level, self.cfg)[0] if self.controls else 1.0

    @property
    def lr_scale(self) -> float:
        """The lr brake the scheduler multiplies by; exactly 1 while watching."""
        return levers(self.effective_level, self.cfg)[1] if self.controls else 1.0

    def probe_losses(self, forward: Forward) -> torch.Tensor:
        """Each probe document's (NLL, tokens): [documents, 2], the same on every rank."""
        return document_losses(forward, self.docs, self.masks, self.seq_len, self.device, whole_documents=True)

    def start(self, forward: Forward) -> None:
        """Measure the probe before the first step (a resumed run restores it instead)."""
        self.base_docs = self.probe_losses(forward)
        tokens = int(self.base_docs[:, 1].sum())
        if not tokens:
            raise ConfigError(
                f"{self.cfg.probe_setting}: the prep's probe documents predict no token (each is one token)"
            )
        self.base_ppl = perplexity_of(self.base_docs)
        log.info(
            "forgetting %s: probe ppl %.3f before training (%d documents, %d tokens)",
            f"budget {self.cfg.budget:.3g}" if self.controls else "watch (no budget: measured, not held)",
            self.base_ppl,
            len(self.base_docs),
            tokens,
        )

    def update(self, forward: Forward) -> dict[str, float]:
        """Measure, move the level; returns what to log."""
        now = self.probe_losses(forward)
        assert self.base_docs is not None, "start() or load_state_dict() first"
        previous = self.rise
        self.rise, error = perplexity_change(self.base_docs, now)
        logged = {"forgetting/probe_rise": self.rise}
        if self.controls:
            self.level = next_level(self.level, self.rise, previous, self.cfg, error)
            self.push = proportional_step(self.rise, previous, self.cfg, error)
            logged |= {"forgetting/scale": self.scale, "forgetting/lr_scale": self.lr_scale}
        if math.isfinite(error):  # nan (one probe document) is not JSON
            logged["forgetting/probe_rise_se"] = error
        return logged

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "level": self.level,
            "push": self.push,
            "base_ppl": self.base_ppl,
            "rise": self.rise,
            "probe": self.probe,
            "base_docs": self.base_docs.tolist() if self.base_docs is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue a checkpoint's controller; refused when its baseline was measured on other documents."""
        if state is None:
            raise ConfigError(
                f"{self.cfg.probe_setting} is set but the checkpoint has no "
                "forgetting-budget state: its probe baseline would be measured on already-trained weights; resume "
                "with it off or start a new run"
            )
        if state.get("version") != STATE_VERSION:
            raise ConfigError(
                f"the checkpoint's forgetting-budget state has format version {state.get('version')}; this "
                f"pipeline reads version {STATE_VERSION}: resume with forgetting off or start a new run"
            )
        if state["probe"] != self.probe:
            raise ConfigError(
                "the checkpoint's forgetting budget measured other probe documents (forgetting.probe_docs or the "
                "prep changed); its baseline does not apply"
            )
        # clamped: a resume may narrow the bounds (min_lr_scale, max_scale) the level was set under
        if self.controls:  # watching only, the level stays 0 whatever a budgeted checkpoint held
            self.level = clamp_level(state["level"], self.cfg)
            self.push = state["push"]
        self.base_ppl, self.rise = state["base_ppl"], state["rise"]
        self.base_docs = torch.tensor(state["base_docs"], dtype=torch.float64)
