"""What the private-aggregation tests drive that a run does not: one round with a one-off
aggregator."""

from __future__ import annotations

from mpifed.federated.private_aggregation import PrivateAggregator


def private_aggregate(fed_cfg, dp, fed, params, global_host, report, senders, rnd, state,
                      sampled: bool = True, identity=None, relay=None, codec=None
                      ) -> dict | None:
    """One round with a one-off PrivateAggregator (tests; runs keep one aggregator); codec:
    federated.compression = "rotated"'s (`rotated.make_codec`)."""
    return PrivateAggregator(fed_cfg, dp, fed, identity, relay, codec=codec)(
        params, global_host, report, senders, sampled, rnd, state)
