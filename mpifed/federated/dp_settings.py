"""The [federated.dp] settings a run uses: derived values filled in, infeasible ones refused."""

from __future__ import annotations

from dataclasses import replace

from ..errors import UserError
from .dp import update_noise_multiplier
from .masked_sum import honest_shares


def default_count_stddev(noise_multiplier: float, expected_sites: float) -> float:
    """Return the clip count's noise stddev when none is set: Andrew et al.'s q*K/20, raised to
    noise_multiplier for small federations, where q*K/20 would leave the updates no noise budget
    (it must exceed noise_multiplier / 2); the updates then keep z / sqrt(3/4). Zero without
    noise."""
    if noise_multiplier == 0:
        return 0.0
    return max(expected_sites / 20, noise_multiplier)


def dp_settings(fed_cfg, institutions: int):
    """Return the DPConfig a run uses (a copy of fed_cfg.dp), or None without DP.

    Derived values are filled in here, never written back into the config: an adaptive run
    without clip_count_stddev gets Andrew et al.'s q*K/20. Raises UserError when the count's
    noise would leave none for the updates, or when under secure aggregation no leader's noise
    share is left that the root and the colluders do not know.
    """
    dp = fed_cfg.dp
    if dp is None:
        return None
    if dp.adaptive and dp.clip_count_stddev is None:
        dp = replace(dp, clip_count_stddev=default_count_stddev(
            dp.noise_multiplier, fed_cfg.fraction * institutions))
    if dp.adaptive:
        try:
            update_noise_multiplier(dp.noise_multiplier, dp.clip_count_stddev)
        except ValueError as err:
            raise UserError(str(err)) from None
    if fed_cfg.secure_aggregation and honest_shares(fed_cfg, dp, institutions) < 1:
        raise UserError(f"federated.dp.colluders: with {institutions} institutions, the root and "
                        f"{dp.colluders} colluding leaders know every noise share; lower it "
                        f"to at most {institutions - 2} or add institutions")
    return dp
