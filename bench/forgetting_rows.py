"""The forgetting bench's rows: each anti-forgetting option as the config it adds to naive CPT, and the budget
and watch settings the budget rows were measured with (each a dict: a row's definition is its config, so a
changed dict reruns the row)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import CACHED_STRATEGIES

TM = {"replay": {"strategy": "tm", "weight": 1.0}}  # replay rows per step: --replay-per-step
# Probed every step: at 10x lr the tiny base's probe rose 110% in the first 5 steps, before a probe every 5
# could act. A row's definition is its config, not the defaults under it: INTEGRAL's rows predate lookahead
# and cautious_start and ran with both off, as their defaults still are; a changed default must drop them.
# Every budget row probes all of the prep's probe documents (--probe-docs; see train_config).
INTEGRAL = {"budget": 0.05, "every": 1, "gain": 0.4}
BUDGET = {"budget": 0.05, "every": 1, "gain": 1.0, "lookahead": 2.0, "cautious_start": True}
# BUDGET with the weights never below the configured ones: below the equilibrium weight the rise climbs back
# over the budget, and stopping it then takes weights far above it (the 1x budget rows' traces). 1x only: at
# 10x BUDGET's scale never fell below x39, so the floor would not bind.
FLOORED = {**BUDGET, "min_scale": 1.0}
# BUDGET starting at the configured weights and full lr: the cautious start is for an lr at which the steps
# before the first probe can spend the budget (10x); at 1x its release held x68-x3.5 through the peak-lr steps.
UNCAUTIOUS = {**BUDGET, "cautious_start": False}
# A proportional term on the rise's error with a small integral, from the configured weights at full lr: the
# rise accumulates past steps, so an integral alone on it (UNCAUTIOUS: gain 1) wound up and braked the lr.
PI = {"budget": 0.05, "every": 1, "gain": 0.1, "proportional": 2.0}
# PI never below the configured weights: PI's seed 0 started at x0.12 (the rise 0, the error -1), let the rise
# reach +7.9% by step 5, and spent steps 14-26 at x3-x5 to take it back.
PI_FLOORED = {**PI, "min_scale": 1.0}
PI_SOFT = {**PI_FLOORED, "gain": 0.3, "proportional": 1.0}
# PI holding the probe's rise plus one standard error: PI held a 256-document probe at +4.7% ± 1.1% and its
# holdout read +6.1% (seed 0), since which documents are scored moves the rise by about that much.
PI_MARGIN = {**PI, "margin": 1.0}
# PI whose proportional term only brakes (release 0): PI's first probe reads the rise 0, before anything is
# trained, and its proportional term took the weights to x0.12-0.13; the probe then peaked at +8-9% by step 5-7.
PI_BRAKE = {**PI, "release": 0.0}
# PI_BRAKE acting on where a climbing rise is heading: its probe still passed 5% by step 6 and peaked at +6.7% by
# step 9, at the peak-lr steps, with the weights near the configured ones until the rise had crossed the budget.
# Measured (bench README): lookahead lowered the peak and left the cost at equal forgetting as it was (0.006-0.007).
PI_AHEAD = {**PI_BRAKE, "lookahead": 1.0}
PI_AHEAD_2 = {**PI_BRAKE, "lookahead": 2.0}
# PI_BRAKE probing every 4 steps, for runs of hundreds of steps (--steps 200): whether the cost at equal forgetting
# in 40-step runs (0.006-0.007 of naive's gain) is the first steps' transient, a smaller share of a longer run.
# Measured (bench README, 3 seeds): it is not, -0.010 at 200 steps; at equal probe peak it learns 0.026 more.
PI_BRAKE_EVERY_4 = {**PI_BRAKE, "every": 4}
# No budget: the probe measured every 4 steps and logged, the weights fixed (a test checks the run is bitwise the
# unwatched one). A budget holds the rise through the run; a fixed weight compared on its end rise need not, so
# these rows give the fixed weights' probe peaks, to compare a budget row with at equal peak too.
WATCH = {"watch": True, "every": 4}
KD = {"kd": {"weight": 1.0}}


def kd_general(weight: float, temperature: float = 1.0) -> dict[str, Any]:
    """KD on the mix's general rows only, at a softmax temperature (the KL is scaled by T²). The default
    temperature is left out of the dict: a row's definition is its dict, and rows stored without it stay valid."""
    kd: dict[str, Any] = {"weight": weight, "rows": "general"}
    if temperature != 1.0:
        kd["temperature"] = temperature
    return {"kd": kd}


KD_GENERAL = kd_general(5.0)


def replay_kl(weight: float) -> dict[str, Any]:
    """KL to the frozen base model on the replay rows, with no CE on them: the rows ride beside the task rows
    (every task row stays a domain row without the mix), and the pull is 0 until the model drifts from the base.
    The samples' forward is left to replay.forward auto (on CPU: packed behind the task rows)."""
    return {"replay": {"strategy": "kl", "weight": weight, "ce_weight": 0.0}}


@dataclass(frozen=True)
class Row:
    name: str
    mixed: bool  # the 15% general mix, or domain rows only
    extra: dict[str, Any] = field(default_factory=dict)
    lr_mult: float = 1.0

    @property
    def definition(self) -> dict[str, Any]:
        """What a stored result was run with: a row whose definition changed is run again."""
        return {"mixed": self.mixed, "extra": self.extra, "lr_mult": self.lr_mult}

    @property
    def holds_budget(self) -> bool:
        """A forgetting budget moves the row's weights (and lr): its fixed-weight siblings are its yardstick."""
        return self.extra.get("forgetting", {}).get("budget") is not None

    @property
    def watched(self) -> bool:
        """Probed and logged with the weights fixed (WATCH)."""
        return bool(self.extra.get("forgetting", {}).get("watch"))

    @property
    def reads_cache(self) -> bool:
        """Whether the row's replay strategy reads the base model's GeRe cache."""
        return self.extra.get("replay", {}).get("strategy") in CACHED_STRATEGIES


# Each of these runs at 3x and 10x lr too (rows "<name>, 3x lr" and "<name>, 10x lr"), beside naive CPT there.
HIGH_LR = [
    ("naive CPT", False, {}),
    ("+ mix + TM (w 1)", True, TM),
    ("+ mix + KD", True, KD),
    ("+ mix + KD on general rows (w 5)", True, KD_GENERAL),
    ("+ mix + KD on general rows (w 10)", True, kd_general(10.0)),
    ("+ replay KL (w 1.5)", False, replay_kl(1.5)),
    ("+ replay KL (w 2)", False, replay_kl(2.0)),
]
ROWS = [
    Row("naive CPT", False),
    Row("+ 15% general mix", True),
    Row("+ mix + replay CE", True, {"replay": {"strategy": "ce"}}),
    Row("+ mix + TM (w 1)", True, TM),
    Row("+ mix + TM (w 100)", True, {"replay": {**TM["replay"], "weight": 100.0}}),
    Row("+ mix + TM (dynamic w)", True, {"replay": {**TM["replay"], "weight": "dynamic"}}),
    Row("+ mix + KD", True, KD),
    Row("+ mix + KD (w 0.3)", True, {"kd": {"weight": 0.3}}),
    Row("+ mix + KD on general rows", True, kd_general(1.0)),
    Row("+ mix + KD on general rows (w 5)", True, KD_GENERAL),
    Row("+ mix + KD on general rows (w 10)", True, kd_general(10.0)),
    Row("+ mix + KD on general rows (w 5, T 2)", True, kd_general(5.0, temperature=2.0)),
    Row("+ mix + KD on general rows (w 8, T 2)", True, kd_general(8.0, temperature=2.0)),
    Row("+ mix + KD on general rows (w 5, T 4)", True, kd_general(5.0, temperature=4.0)),
    Row("+ replay KL (w 0.5)", False, replay_kl(0.5)),
    Row("+ replay KL (w 1)", False, replay_kl(1.0)),
    Row("+ replay KL (w 1.5)", False, replay_kl(1.5)),
    Row("+ replay KL (w 2)", False, replay_kl(2.0)),
    Row("+ replay KL (w 2.5)", False, replay_kl(2.5)),
    Row("+ replay KL (w 3)", False, replay_kl(3.0)),
    Row("+ mix + replay KL (w 1)", True, replay_kl(1.0)),
    Row("+ mix + L2-SP", True, {"penalty": {"kind": "l2sp", "weight": 50.0}}),
    Row("+ mix + EWC", True, {"penalty": {"kind": "ewc", "weight": 50.0}}),
    Row("+ mix + TM + KD", True, {**TM, **KD}),
    Row("+ mix + TM, no replay CE", True, {"replay": {**TM["replay"], "ce_weight": 0.0}}),
    Row("+ mix + TM, 2 replay samples", True, {"replay": {**TM["replay"], "samples_per_step": 2}}),
    *(Row(f"{name}, {mult:g}x lr", mixed, extra, mult) for mult in (3.0, 10.0) for name, mixed, extra in HIGH_LR),
    Row("+ mix + TM, budget 5%, integral only", True, {**TM, "forgetting": INTEGRAL}),
    Row("+ mix + TM, budget 5%, integral only, 10x lr", True, {**TM, "forgetting": INTEGRAL}, 10.0),
    Row("+ mix + KD, budget 5%", True, {**KD, "forgetting": BUDGET}),
    Row("+ mix + KD, budget 5%, 10x lr", True, {**KD, "forgetting": BUDGET}, 10.0),
    Row("+ mix + KD on general rows (w 5), budget 5%", True, {**KD_GENERAL, "forgetting": BUDGET}),
    Row("+ mix + KD on general rows (w 5), budget 5%, 10x lr", True, {**KD_GENERAL, "forgetting": BUDGET}, 10.0),
    Row("+ replay KL (w 1), budget 5%", False, {**replay_kl(1.0), "forgetting": BUDGET}),
    Row("+ replay KL (w 1), budget 5%, 10x lr", False, {**replay_kl(1.0), "forgetting": BUDGET}, 10.0),
    Row("+ mix + KD on general rows (w 5), budget 5% floored", True, {**KD_GENERAL, "forgetting": FLOORED}),
    Row(
        "+ mix + KD on general rows (w 5), budget 5%, no cautious start", True, {**KD_GENERAL, "forgetting": UNCAUTIOUS}
    ),
    Row("+ replay KL (w 1.5), budget 5%, PI", False, {**replay_kl(1.5), "forgetting": PI}),
    Row("+ replay KL (w 1.5), budget 5%, PI floored", False, {**replay_kl(1.5), "forgetting": PI_FLOORED}),
    Row("+ replay KL (w 1.5), budget 5%, PI floored, gain 0.3, P 1", False, {**replay_kl(1.5), "forgetting": PI_SOFT}),
    Row("+ replay KL (w 1.5), budget 5%, PI, margin 1 se", False, {**replay_kl(1.5), "forgetting": PI_MARGIN}),
    Row("+ replay KL (w 1.5), budget 5%, PI, brake-only P", False, {**replay_kl(1.5), "forgetting": PI_BRAKE}),
    Row(
        "+ replay KL (w 1.5), budget 5%, PI, brake-only P, lookahead 1",
        False,
        {**replay_kl(1.5), "forgetting": PI_AHEAD},
    ),
    Row(
        "+ replay KL (w 1.5), budget 5%, PI, brake-only P, lookahead 2",
        False,
        {**replay_kl(1.5), "forgetting": PI_AHEAD_2},
    ),
    Row(
        "+ replay KL (w 1.5), budget 5%, PI, brake-only P, every 4",
        False,
        {**replay_kl(1.5), "forgetting": PI_BRAKE_EVERY_4},
    ),
    Row("+ replay KL (w 1.5), probed every 4", False, {**replay_kl(1.5), "forgetting": WATCH}),
    Row("+ replay KL (w 2), probed every 4", False, {**replay_kl(2.0), "forgetting": WATCH}),
    Row("+ replay KL (w 3), probed every 4", False, {**replay_kl(3.0), "forgetting": WATCH}),
]
# The levers users reach for first (LoRA, merging after training, WSD), against naive CPT and the default. LoRA
# trains at 10x the full model's lr, as LoRA recipes do; alpha = 2r keeps the update's scale across ranks.
LORA_R8 = {"adapter": {"kind": "lora", "r": 8, "alpha": 16.0}}
LORA_R64 = {"adapter": {"kind": "lora", "r": 64, "alpha": 128.0}}
MERGE_5 = {"merge": {"to_budget": 0.05}}  # the largest share of the change whose probe rise is within 5%
AVERAGE_LAST_4 = {"checkpoint": {"every": 5, "keep_last": 4}, "merge": {"average_last": 4}}  # steps 25-40
WSD = {"optim": {"decay": "wsd"}}  # the config's default decay fraction (0.1) and shape (1-sqrt)
LEVERS = [
    Row("+ LoRA r 8 (lr 10x)", False, LORA_R8, 10.0),
    Row("+ LoRA r 64 (lr 10x)", False, LORA_R64, 10.0),
    Row("+ LoRA r 8 (lr 10x) + replay KL (w 1.5)", False, {**LORA_R8, **replay_kl(1.5)}, 10.0),
    Row("merged naive CPT (5% budget)", False, MERGE_5),
    Row("+ replay KL (w 1.5), merged (5% budget)", False, {**replay_kl(1.5), **MERGE_5}),
    Row("merged naive CPT (5% budget), 10x lr", False, MERGE_5, 10.0),
    Row("+ replay KL (w 1.5), merged (5% budget), 10x lr", False, {**replay_kl(1.5), **MERGE_5}, 10.0),
    Row("averaged naive CPT (last 4 checkpoints)", False, AVERAGE_LAST_4),
    Row("+ WSD instead of cosine", False, WSD),
    Row("+ replay KL (w 1.5) + WSD", False, {**replay_kl(1.5), **WSD}),
    Row("+ replay KL (w 3) + WSD", False, {**replay_kl(3.0), **WSD}),
    Row("+ replay KL (w 3) + WSD, 3x lr", False, {**replay_kl(3.0), **WSD}, 3.0),
    Row("+ replay KL (w 3) + WSD, 10x lr", False, {**replay_kl(3.0), **WSD}, 10.0),
]
ROWS += LEVERS
DEFAULT = "+ replay KL (w 3) + WSD"  # what cpt init and the demo run: the summary line compares it with naive CPT
TM_ROW = "+ mix + TM (w 1)"  # GeRe's configuration, reported beside it


def naive_of(name: str) -> str:
    lr = next((part for part in name.split(", ") if part.endswith("x lr")), "")
    return "naive CPT" + (f", {lr}" if lr else "")


def without_weights(extra: dict[str, Any]) -> dict[str, Any]:
    """A row's options with the replay and KD weights (and a budget or a watch) left out: what its fixed-weight
    siblings share."""
    out = {k: v for k, v in extra.items() if k != "forgetting"}
    for key in ("replay", "kd"):
        if key in out:
            out[key] = {k: v for k, v in out[key].items() if k != "weight"}
    return out
