"""The quiet barrier: no rank leaves before the last one arrives (checked against the arrival
times every rank reports), and it sleeps rather than spins while it waits."""

from __future__ import annotations

import time

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm.quiet import after_quiet_barrier, quiet_barrier

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs


def test_no_rank_leaves_before_the_last_arrives():
    comm = MPI.COMM_WORLD
    comm.Barrier()
    time.sleep(0.05 * comm.rank)  # arrivals 50 ms apart
    arrived = time.time()
    cpu = time.process_time()
    quiet_barrier(comm)
    left, cpu = time.time(), time.process_time() - cpu
    times = np.empty((comm.size, 2))
    comm.Allgather(np.array([arrived, left]), times)
    assert left >= times[:, 0].max()  # (same host: one clock)
    if comm.rank == 0 and comm.size > 1:  # waited about 50 ms * (size - 1)
        assert cpu < 0.5 * (left - arrived)  # mostly asleep, not polling


def test_after_quiet_barrier_waits_also_when_the_call_raises():
    comm = MPI.COMM_WORLD

    def fail_on_rank_0():
        if comm.rank == 0:
            raise ValueError("only here")
        return comm.rank

    if comm.rank == 0:
        with pytest.raises(ValueError):
            after_quiet_barrier(comm, fail_on_rank_0)
    else:
        assert after_quiet_barrier(comm, fail_on_rank_0) == comm.rank
    comm.Barrier()  # every rank got here: nobody was left in the quiet barrier
