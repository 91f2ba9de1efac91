"""Who takes part in a federated round: a public seeded sample, or under secure aggregation with
DP each institution's own secret draw."""

from __future__ import annotations

import numpy as np

from ..federated.dp import secure_bernoulli
from ..federated.institutions import participants
from .federated_site import Site


def round_senders(fed_cfg, seed: int, fed, site: Site, rnd: int) -> tuple[list[int], bool]:
    """Return (the institutions whose leaders send this round, whether this one trains).

    Under secure aggregation with DP every leader sends every round and draws its own
    participation from os.urandom (shared inside its institution only): the root learns neither
    who took part nor how many. Otherwise the sample is public (seeded by `seed`, run.seed):
    Poisson under DP (accounted without amplification), a fixed-size draw without.
    """
    count = len(fed.sizes)
    if fed_cfg.secure_aggregation and site.dp:
        drawn = np.array([secure_bernoulli(fed_cfg.fraction) if fed.is_leader else 0],
                         dtype=np.int64)
        fed.site.Bcast(drawn, root=0)  # inside the institution
        return list(range(count)), bool(drawn[0])
    choose = poisson_participants if site.dp else participants
    chosen = choose(count, fed_cfg.fraction, seed, rnd)
    return chosen, fed.institution in chosen


def poisson_participants(count: int, q: float, seed: int, round_index: int) -> list[int]:
    """Return a public Poisson sample (each institution alone with probability q), seeded: the
    root sees who sends anyway, so no amplification is claimed for it."""
    if q >= 1:
        return list(range(count))
    rng = np.random.default_rng([seed, round_index, 0x706F6973])
    return [k for k in range(count) if rng.random() < q]

