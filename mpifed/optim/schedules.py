"""Learning-rate schedules: constant, step, cosine, after an optional linear warm-up.

The warm-up ramps from lr/warmup to lr over `warmup` steps (Goyal et al. 2017, for large global
batches); the schedule then runs over the remaining steps.
"""

from __future__ import annotations

import math

SCHEDULES = ("constant", "step", "cosine")


def learning_rate(step: int, lr: float, total_steps: int, schedule: str = "constant",
                  warmup: int = 0, step_size: int = 1, gamma: float = 0.1) -> float:
    """Return the learning rate of 0-based `step` of `total_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    done, span = step - warmup, max(1, total_steps - warmup)
    if schedule == "constant":
        return lr
    if schedule == "step":
        return lr * gamma ** (done // step_size)
    if schedule == "cosine":
        return 0.5 * lr * (1 + math.cos(math.pi * min(done, span) / span))
    raise ValueError(f"optim.schedule: {schedule!r} is not one of {SCHEDULES}")
