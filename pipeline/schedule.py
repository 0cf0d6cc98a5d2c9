"""Learning-rate schedule: linear warmup, then cosine or linear decay to a floor, or constant.

A pure function of the step, so a resumed run and the tests compute the same
value without replaying anything. ``step`` counts optimizer steps from 0; the
lr of step 0 is the first warmup value (never 0, which would waste a step).
"""

from __future__ import annotations

import math


def lr_at(
    step: int, peak: float, total_steps: int, warmup_steps: int, decay: str = "cosine", min_lr_ratio: float = 0.1
) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if decay == "constant":
        return peak
    floor = peak * min_lr_ratio
    span = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / span, 1.0)
    if decay == "linear":
        return floor + (peak - floor) * (1.0 - progress)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_steps_for(total_steps: int, warmup_steps: int | None, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps is not None else int(round(total_steps * warmup_ratio))
