"""A federation's privacy budget: every leader keeps the public release entries in its own
ledger and decides for itself whether a round stays within federated.dp.max_epsilon; a round
runs only if every leader says so, so a root that says "go" past the budget is refused.

The root writes each round's release in the round itself (`record_release`, before any vector
is sent); the other leaders write theirs when they admit the round (`admit_round`), earlier
still, so a round that is refused or aborted later stays counted everywhere.
"""

from __future__ import annotations

import numpy as np

from ..federated.institutions import Federation
from ..federated.ledger import PrivacyLedger, ledger_epsilon, release_entry, unamplified
from ..log import get_logger
from .federated_sampling import poisson_participants
from .federated_site import Site

log = get_logger(__name__)


def open_ledger(out: str, fed: Federation) -> PrivacyLedger:
    """Open this leader's ledger (the root's in run.out, the others' in run.out/institution-K),
    cutting a torn last line with a warning."""
    ledger = PrivacyLedger(out, fed.institution)
    if ledger.cut:
        log.warning("privacy ledger %r: cut a torn last line (%d bytes, from a write that a "
                    "crash interrupted before its fsync, so no vector of its round was sent); "
                    "%d releases remain", ledger.path, ledger.cut, len(ledger.entries))
    return ledger


def admit_round(cfg, site: Site, fed: Federation, rnd: int) -> bool:
    """Tell whether round `rnd` (0-based) may run: no leader's own ledger, with the round
    added in the worst case, passes federated.dp.max_epsilon (collective over the world).

    Each leader decides from its own entries and the verdicts are all-gathered among the
    leaders, so one honest leader's "stop" stops every rank. A leader that admits the round
    (other than the root, which writes in `record_release`) appends its release now.
    """
    dp, fed_cfg = site.dp, cfg.federated
    if not dp:
        return True
    stop = np.zeros(1, dtype=np.int64)
    if fed.is_leader:
        own = np.array([_over_budget(dp, site.ledger, fed_cfg, len(fed.sizes), rnd)],
                       dtype=np.int64)
        verdicts = np.empty(fed.leaders.size, dtype=np.int64)
        fed.leaders.Allgather(own, verdicts)  # numbers, never a pickle
        stop[0] = verdicts.max()
        if own[0] and not verdicts[0]:
            log.warning("institution %d refuses round %d: its own ledger %r puts epsilon past "
                        "federated.dp.max_epsilon = %g, though the root would run it",
                        fed.institution, rnd + 1, site.ledger.path, dp.max_epsilon)
        if not stop[0] and not fed.is_root:
            site.ledger.append(release_entry(dp, rnd, fed_cfg.fraction,
                                             _public_senders(cfg, fed, rnd)))
    fed.site.Bcast(stop, root=0)  # inside the institution
    return not stop[0]


def _over_budget(dp, ledger: PrivacyLedger, fed_cfg, institutions: int, rnd: int) -> bool:
    """Tell whether round `rnd` would take this ledger's epsilon past dp.max_epsilon, counting
    every release in it (replayed rounds included) and the round with every institution."""
    if not dp.max_epsilon:
        return False
    everyone = None if fed_cfg.secure_aggregation else list(range(institutions))
    next_one = release_entry(dp, rnd, fed_cfg.fraction, everyone)  # the worst case
    eps, _ = ledger_epsilon(dp, [*ledger.entries, next_one], institutions)
    return eps > dp.max_epsilon


def _public_senders(cfg, fed: Federation, rnd: int) -> list[int] | None:
    """Return the institutions that send round `rnd` as the root sees them (the public seeded
    sample under DP alone), or None under secure aggregation (secret sampling)."""
    fed_cfg = cfg.federated
    if fed_cfg.secure_aggregation:
        return None
    return poisson_participants(len(fed.sizes), fed_cfg.fraction, cfg.run.seed, rnd)


def record_release(site: Site, fed: Federation, fed_cfg, rnd: int, senders) -> dict:
    """On the root under DP: write the round's release to the ledger (before any vector is
    sent) and return the record's epsilon fields, counting every release in the ledger."""
    secure = fed_cfg.secure_aggregation
    site.ledger.append(release_entry(site.dp, rnd, fed_cfg.fraction,
                                     None if secure else senders))
    return epsilon_fields(site.dp, site.ledger.entries, len(fed.sizes))


def epsilon_fields(dp, entries: list[dict], institutions: int) -> dict:
    """Return a record's epsilon fields of `entries`: epsilon, epsilon_unamplified (every
    round sent counted at q = 1), releases and, without secure aggregation, the epsilon of
    each institution."""
    eps, each = ledger_epsilon(dp, entries, institutions)
    fields = {"epsilon": eps,
              "epsilon_unamplified": ledger_epsilon(dp, unamplified(entries), institutions)[0],
              "releases": len(entries)}
    if each is not None:
        fields["epsilon_per_institution"] = each
    return fields
