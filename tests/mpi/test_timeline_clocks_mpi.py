"""Clock alignment of the timeline across ranks, with injected clocks: each rank's clock is
shifted by a known amount (as hosts whose clocks count from their own boot), and the measured
offsets must recover the shifts within half the round trip that measured them.

The shifted clocks start from time.monotonic (CLOCK_MONOTONIC: one clock for every process on a
host), not MPI.Wtime: Open MPI counts MPI.Wtime from each process's own MPI_Init, so two ranks'
Wtime differ by their start-up gap, which the measurement rightly finds but the shift does not
name."""

from __future__ import annotations

import json
import os
import time

import pytest
from mpi4py import MPI

from mpifed.train.timeline import Timeline, clock_offsets, part_path


def shift(rank: int) -> float:
    return 1000.0 * rank + 0.125 * rank * rank  # seconds; rank 0's clock is the host's


@pytest.mark.mpi(min_size=2)
def test_offsets_recover_injected_clock_shifts():
    world = MPI.COMM_WORLD
    mine = shift(world.rank)
    offset, trip = clock_offsets(world, clock=lambda: time.monotonic() + mine)
    if world.rank == 0:
        assert (offset, trip) == (0.0, 0.0)
    else:
        assert trip > 0
        assert abs(offset - (mine - shift(0))) <= trip / 2 + 1e-6


@pytest.mark.mpi(min_size=2)
def test_a_ranks_spans_land_on_rank_0s_clock(tmp_path_factory):
    world = MPI.COMM_WORLD
    folder = world.bcast(str(tmp_path_factory.mktemp("trace")) if world.rank == 0 else None)
    path = f"{folder}/timeline.json"
    mine = shift(world.rank)
    timeline = Timeline.open(True, world, path, clock=lambda: MPI.Wtime() + mine)
    # base: from rank 0's reading to this rank's, on rank 0's clock. The shift (1000 s per
    # rank) is gone; what is left is how far apart the two readings were taken.
    assert abs(timeline.base) < 1.0
    timeline.span("compute", timeline.origin, timeline.origin + 0.5, 1)
    timeline.write(world, path, {"world_size": world.size})
    if world.rank == 0:
        trace = json.load(open(path))
        spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert sorted(e["pid"] for e in spans) == list(range(world.size))
        assert all(abs(e["ts"]) < 1e6 for e in spans)  # microseconds near the common zero
    world.Barrier()
    assert not any(os.path.exists(part_path(path, r)) for r in range(world.size))
