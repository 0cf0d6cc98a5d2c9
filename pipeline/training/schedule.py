"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor, constant, or WSD.

WSD (warmup-stable-decay) holds the peak after warmup and decays only over the
last ``decay_fraction`` of the steps (shape linear, cosine or 1-sqrt), so a
run can be extended from a checkpoint taken before the decay, or re-warmed
from a decayed one with ``init_from``. A pure function of the step, so a
resumed run and the tests compute the same value without replaying anything.
``step`` counts optimizer steps from 0; the lr of step 0 is the first warmup
value (never 0, which would waste a step).
"""

from __future__ import annotations

import math


def lr_at(
    step: int,
    peak: float,
    total_steps: int,
    warmup_steps: int,
    decay: str = "cosine",
    min_lr_ratio: float = 0.1,
    decay_fraction: float = 0.1,
    decay_shape: str = "linear",
) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if decay == "constant":
        return peak
    start = warmup_steps
    if decay == "wsd":  # stable at the peak until the last decay_fraction of the run
        start = max(warmup_steps, total_steps - int(round(decay_fraction * total_steps)))
        decay = decay_shape
    floor = peak * min_lr_ratio
    span = max(total_steps - start, 1)
    progress = min(max(step - start, 0) / span, 1.0)
    if decay == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    if decay == "1-sqrt":
        return floor + (peak - floor) * (1.0 - math.sqrt(progress))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps is not None else int(round(total_steps * warmup_ratio))
