"""Step planning on COMM_WORLD: the smallest shard sets every rank's steps; a batch too large
fails on every rank."""

from __future__ import annotations

import pytest
from helpers import merged
from mpi4py import MPI

from mpifed.errors import UserError
from mpifed.train.config import resolve
from mpifed.train.setup import plan_steps


def config(**optim):
    return resolve(merged({"data": {"train": "d.h5"}, "optim": optim})).optim


@pytest.mark.mpi(min_size=1)
def test_the_smallest_shard_decides_on_every_rank():
    world = MPI.COMM_WORLD
    shard = 20 + 3 * (world.size - 1 - world.rank)  # the last rank holds the fewest rows
    assert plan_steps(config(batch_size=4, epochs=2), shard, world) == (5, 10)
    with pytest.raises(UserError, match=f"smallest shard \\(20 rows on {world.size} ranks\\)"):
        plan_steps(config(batch_size=21), shard, world)  # every rank raises, none waits
