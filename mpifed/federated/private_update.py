"""What the root makes of a private round's sums: the mean update, the next adaptive clip and
the new global model (pure: arrays in, arrays out)."""

from __future__ import annotations

import numpy as np

from .dp import COUNT_SENSITIVITY, adapt_clip


def mean_update(sums: dict, dp, institutions: int, q: float) -> np.ndarray:
    """Return the mean update: / sum of weights, or / q*K (DP's fixed denominator)."""
    denominator = q * institutions if dp else sums["weight"]
    if denominator <= 0:
        return np.zeros_like(sums["delta_sum"])
    return sums["delta_sum"] / denominator


def next_clip(dp, clip: float, sums: dict, institutions: int, q: float) -> float:
    """Adaptive clipping: move the clip toward the target quantile of the update norms.

    The noised sum of (b - 1/2) over the participants, / q K, plus the 1/2 added back.
    """
    if not dp.adaptive:
        return clip
    fraction_under = sums["under_clip"] / max(q * institutions, 1e-12) + COUNT_SENSITIVITY
    return adapt_clip(clip, fraction_under, dp.target_quantile, dp.clip_lr)


def apply_private_sums(strategy, dp, sums, global_params, institutions: int, q: float,
                       state: dict, hyper):
    """On the root: turn the private sums into (new global model, server state, record fields).

    strategy: a STRATEGIES function, applied to the one averaged model (global + mean update).
    The record fields: without DP the institutions' mean loss; under DP the clip used (no loss:
    it would be a release outside the accounting).
    """
    mean = mean_update(sums, dp, institutions, q)
    new, new_state = strategy(global_params, [(global_params + mean, 1.0, 1.0)], state, hyper)
    record = {}
    if dp is None and sums["weight"] > 0:
        record["loss"] = sums["loss"] / sums["weight"]
    if dp:
        new_state["dp_clip"] = np.array(next_clip(dp, sums["clip"], sums, institutions, q))
        record["clip"] = sums["clip"]
    return new, new_state, record
