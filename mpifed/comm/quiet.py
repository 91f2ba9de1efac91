"""Waiting for other ranks without holding a core.

A blocking MPI call in MPICH (and Open MPI) polls at full speed. A federated leader that waits
for the other institutions' local training, or every rank that waits for the root's
aggregation, then takes a core from the very ranks it waits for wherever ranks share cores: a
laptop, a busy shared node, the federated benchmark (4 ranks on 2 cores). `quiet_barrier` waits
in a nonblocking barrier, testing it between short sleeps. Data then moves with the ordinary
blocking calls once every rank is there: a large message progresses only while both sides poll,
so sleeping during a transfer would slow it down.

    quiet_barrier(fed.world)          # collective: returns when every rank has called it
    leaders.Send(ring, 0, tag)        # the transfer itself, at full speed
"""

from __future__ import annotations

import time

SPIN_SECONDS = 2e-4  # poll at full speed this long first: a barrier that is nearly done
NAP_SECONDS = 5e-4  # then sleep this long between tests (the latency it may add)


def wait_quietly(request) -> None:
    """Wait for an MPI request, sleeping between tests once it has not completed at once."""
    spin_until = time.perf_counter() + SPIN_SECONDS
    while not request.Test():
        if time.perf_counter() > spin_until:
            time.sleep(NAP_SECONDS)


def quiet_barrier(comm) -> None:
    """Barrier on `comm` (collective) that leaves the cores to the ranks still working."""
    if comm.size > 1:
        wait_quietly(comm.Ibarrier())


def after_quiet_barrier(comm, fn):
    """Call fn(), then wait in `quiet_barrier` (also when fn raised: no rank is left waiting);
    return fn()'s result."""
    try:
        return fn()
    finally:
        quiet_barrier(comm)
