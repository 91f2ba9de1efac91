"""A federation's privacy budget: the root writes each round's release to the ledger and stops the
run before a round would take epsilon past federated.dp.max_epsilon."""

from __future__ import annotations

import numpy as np

from ..federated.institutions import Federation
from ..federated.ledger import ledger_epsilon, release_entry
from .federated_site import Site


def over_budget(site: Site, fed: Federation, fed_cfg, rnd: int) -> bool:
    """Tell whether round `rnd` (0-based) would take epsilon past federated.dp.max_epsilon,
    counting every release in the ledger (replayed rounds included). The root decides."""
    dp = site.dp
    if not dp or not dp.max_epsilon:
        return False
    verdict = np.zeros(1, dtype=np.int64)
    if fed.is_root:
        everyone = None if fed_cfg.secure_aggregation else list(range(len(fed.sizes)))
        next_one = release_entry(dp, rnd, fed_cfg.fraction, everyone)  # the worst case
        eps, _ = ledger_epsilon(dp, [*site.ledger.entries, next_one], len(fed.sizes))
        verdict[0] = eps > dp.max_epsilon
    fed.world.Bcast(verdict, root=0)
    return bool(verdict[0])


def record_release(site: Site, fed: Federation, fed_cfg, rnd: int, senders) -> dict:
    """On the root under DP: write the round's release to the ledger (before any vector is
    sent) and return the record's epsilon fields, counting every release in the ledger."""
    secure = fed_cfg.secure_aggregation
    site.ledger.append(release_entry(site.dp, rnd, fed_cfg.fraction,
                                     None if secure else senders))
    eps, each = ledger_epsilon(site.dp, site.ledger.entries, len(fed.sizes))
    fields = {"epsilon": eps, "releases": len(site.ledger.entries)}
    if each is not None:
        fields["epsilon_per_institution"] = each
    return fields

