"""The forgetting budget: hold the rise of general perplexity under what the user allows, and no lower.

Every ``forgetting.every`` steps all ranks score the prep's probe documents
(general text no split shares: not trained on, replayed or in the holdout the
report scores), each alone and whole, as the report scores its holdout, and
compare the probe perplexity with its value before the first step. The rise
is logged with its standard error over documents (``probe_rise_se``): how far
a probe of other documents would read, which bounds how closely any
controller can hold a budget measured on the report's documents. On the
bench's tiny base a 256-document probe logged ±1.0-1.2 points at a 4-5%
rise, because forgetting differs between documents (bench README). ``margin`` holds the rise
plus that many standard errors under the budget. The level ``u`` moves
with the relative error ``e`` of the rise, projected ``lookahead`` probe
intervals ahead at its last rate while it climbs; the levers read it plus a
proportional term on the same error:

    rise = ppl / ppl_0 − 1,   projected = rise + lookahead · max(rise − previous rise, 0) + margin · se(rise)
    e = (projected − budget) / budget
    u ← clamp(u + gain · e, log min_scale, log max_scale − log min_lr_scale)      (the integral)
    level = clamp(u + proportional · e, same bounds)                              (until the next probe)

and the level drives two levers in turn. Up to ``log max_scale`` it is the log of the
scale ``s`` on the anti-forgetting weights (replay CE, the replay term, KD: the
objective's ``anti_forgetting_scale``); beyond, ``s`` stays at max_scale and
the learning rate is multiplied by ``exp(log max_scale − u)``, down to
min_lr_scale. Weights first, because they trade domain learning for general
ability; the brake, because at a high lr they cannot hold it: Adam's step
has the lr's size whatever the loss weights, and the bench's 10x-lr budget
row rose past naive CPT with the weights alone at their ceiling. Below the
budget ``u`` falls: the lr comes back first, then the weights shrink and the
domain gets what the budget allows.

The law's measured weakness (bench README): the rise is itself an accumulation
of past steps and falls back slowly even at full brake, so a law on the rise
as measured acts once the budget is spent and winds up; and no feedback undoes
a step taken before the first probe. Two options address them, both off by
default: ``lookahead`` acts on where a climbing rise is heading (a
proportional term beside the integral), and ``cautious_start`` starts the
level at its ceiling and releases it while the probe stays under budget. The
projection is one-sided because a falling rise says nothing about how large a
step the lr can take: projected down, a rise recovering at 10x lr released the
whole brake in one update, and the next step took the probe from +5% to +205%
(bench README). With both and KD as the lever, the bench's 5% budget held at
10x lr where fixed weights did not, but at 1x both cost learning, and at the
default ``every`` a cautious start holds full protection for hundreds of
steps, so neither is the default.

``proportional`` answers the integral's windup at 1x: the rise is the
integral of past steps, so a controller that integrates its error again
overshoots whichever way it starts. With a small integral (gain 0.1) and
proportional 2, from the configured replay KL weight at full lr, the bench's
5% budget ended at +4.2% on the holdout in 3 of 3 seeds and learned 0.87 of
naive CPT's domain gain, where the integral with both options learned 0.77;
the best fixed weight under 5% learns 0.90 (bench README). It is off by
default: it was tuned on 40-step runs probed every step. ``release`` scales the proportional term
below the budget (0: it only brakes). On the bench it halved PI's shortfall against the fixed weights at
equal forgetting (0.013 to 0.007 of naive's gain, about one seed spread): the early overshoot comes from
the peak-lr steps, not from the first probe's release, so it stays 1 by default. ``lookahead`` 1 or 2 on that
brake-only law lowered the probe's peak but not the cost (0.006-0.007): to first order a step's forgetting and
its domain gain both scale with the update, so the best trade is a near-constant weight, which a fixed weight
tuned in hindsight already is and a feedback law can only approach (bench README, reasoning there). Over 200
steps the cost at equal end rise stayed (0.010), but both watched fixed weights' rises peaked over the budget mid-run
and came back as the lr decayed; against fixed weights with the same peak (``watch``) brake-only PI learned
0.026 more of naive's gain (3 seeds).

With ``watch`` and no budget the probe is measured and logged and nothing else happens: both levers read
exactly 1 whatever the other settings (a cautious start included), so the trainer's applying them at the start
sets the schedule's own lr (undoing a budgeted checkpoint's brake on resume). The bench uses that for the
forgetting curve of
a fixed weight, which the budget's run is compared with: a budget holds the rise through the run, while a
fixed weight judged on its end rise may pass the budget on the way.

The probe loss is an all-reduced sum, so every rank computes the same ``u``;
the state (``u``, the proportional term, ``ppl_0``, the last rise) is in the checkpoint, so a
resumed run continues exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
from typing import Any

import torch

from cpt_core.errors import ConfigError

from .config import ForgettingConfig
from .perplexity import Forward, document_losses, perplexity_change, perplexity_of

log = logging.getLogger(__name__)


def relative_error(rise: float, previous: float, cfg: ForgettingConfig, rise_se: float = 0.0) -> float:
    """(projected rise − budget) / budget from the rise just measured, its standard error over the probe's
    documents and the rise before it (0 at the first update: the baseline); see the module docstring. +inf when
    the rise is not finite (the probe loss diverged)."""
    assert cfg.budget is not None
    # One-sided (see the module docstring); a previous rise that was not finite has no slope to project.
    climb = rise - previous if cfg.lookahead > 0 and math.isfinite(previous) else 0.0
    # margin: hold the rise's upper estimate, so that other documents than the probe's stay under the budget too
    # (a checkpoint from before per-document baselines has no error: nan, taken as 0)
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
        self.whole_documents = True  # a checkpoint from before whole-document probes keeps first windows

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
        return document_losses(forward, self.docs, self.masks, self.seq_len, self.device, self.whole_documents)

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
        previous, error = self.rise, math.nan
        if self.base_docs is not None:
            self.rise, error = perplexity_change(self.base_docs, now)
        else:  # a checkpoint from before per-document baselines kept the probe's perplexity only
            self.rise = perplexity_of(now) / self.base_ppl - 1.0
        logged = {"forgetting/probe_rise": self.rise}
        if self.controls:
            self.level = next_level(self.level, self.rise, previous, self.cfg, error)
            self.push = proportional_step(self.rise, previous, self.cfg, error)
            logged |= {"forgetting/scale": self.scale, "forgetting/lr_scale": self.lr_scale}
        if math.isfinite(error):  # nan (a checkpoint from before, one document) is not JSON
            logged["forgetting/probe_rise_se"] = error
        return logged

    def state_dict(self) -> dict[str, Any]:
        return {
            "level": self.level,
            "push": self.push,
            "base_ppl": self.base_ppl,
            "rise": self.rise,
            "probe": self.probe,
            "base_docs": self.base_docs.tolist() if self.base_docs is not None else None,
            "whole_documents": self.whole_documents,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue a checkpoint's controller; refused when its baseline was measured on other documents."""
        if state is None:
            raise ConfigError(
                f"{self.cfg.probe_setting} is set but the checkpoint has no "
                "forgetting-budget state: its probe baseline would be measured on already-trained weights; resume "
                "with it off or start a new run"
            )
        if state["probe"] != self.probe:
            raise ConfigError(
                "the checkpoint's forgetting budget measured other probe documents (forgetting.probe_docs or the "
                "prep changed); its baseline does not apply"
            )
        # checkpoints written before the lr brake kept the scale: its log is the same level
        # clamped: a resume may narrow the bounds (min_lr_scale, max_scale) the level was set under
        if self.controls:  # watching only, the level stays 0 whatever a budgeted checkpoint held
            self.level = clamp_level(state["level"] if "level" in state else math.log(state["scale"]), self.cfg)
            self.push = state.get("push", 0.0)  # checkpoints written before the proportional term had none
        self.base_ppl, self.rise = state["base_ppl"], state["rise"]
        # Checkpoints written before whole-document probes measured their baseline on first windows, without
        # per-document losses: they go on as they started (no standard error), so the resumed rise is the same.
        self.whole_documents = state.get("whole_documents", False)
        docs = state.get("base_docs")
        self.base_docs = torch.tensor(docs, dtype=torch.float64) if docs is not None else None
