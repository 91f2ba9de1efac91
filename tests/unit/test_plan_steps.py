"""Step planning: the smallest shard sets the steps of an epoch on every rank.

Runs serially on COMM_SELF and, marked mpi, under mpiexec on COMM_WORLD.
"""

from __future__ import annotations

import pytest
from helpers import merged
from mpi4py import MPI

from mpifed.errors import UserError
from mpifed.train.config import resolve
from mpifed.train.setup import plan_steps


def config(**optim):
    return resolve(merged({"data": {"train": "d.h5"}, "optim": optim})).optim


@pytest.mark.parametrize("optim,shard,expected", [
    ({"batch_size": 4, "steps": 7}, 10, (2, 7)),      # steps given: as many as asked
    ({"batch_size": 4, "epochs": 3}, 10, (2, 6)),     # epochs: whole batches only (10 // 4)
    ({"batch_size": 5}, 10, (2, 2)),                  # the default: one epoch
    ({"batch_size": 10, "epochs": 2}, 10, (1, 2)),
])
def test_steps_from_steps_or_epochs(optim, shard, expected):
    assert plan_steps(config(**optim), shard, MPI.COMM_SELF) == expected


def test_a_batch_larger_than_the_shard_is_a_user_error():
    with pytest.raises(UserError, match=r"optim.batch_size: 11 rows per rank is more than the "
                                        r"smallest shard \(10 rows on 1 ranks\)"):
        plan_steps(config(batch_size=11), 10, MPI.COMM_SELF)
