"""The collective error flag: a UserError on any rank is raised on every rank, with one message."""

from __future__ import annotations

import pytest
from mpi4py import MPI

from mpifed.comm.agree import raise_together
from mpifed.errors import UserError

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs

COMMS = [pytest.param(MPI.COMM_SELF, id="self"), pytest.param(MPI.COMM_WORLD, id="world")]


def fail_on(ranks, comm, message):
    """Return a function that raises UserError(message(rank)) on `ranks`, else returns the rank."""
    def fn():
        if comm.rank in ranks:
            raise UserError(message(comm.rank))
        return comm.rank
    return fn


def raised_everywhere(comm, fn) -> str:
    """Call raise_together; assert every rank raised the same message; return it."""
    with pytest.raises(UserError) as info:
        raise_together(comm, fn)
    messages = comm.allgather(str(info.value))
    assert len(set(messages)) == 1, messages
    return messages[0]


@pytest.mark.parametrize("comm", COMMS)
def test_no_failure_returns_each_ranks_result(comm):
    assert raise_together(comm, fail_on((), comm, str)) == comm.rank


@pytest.mark.parametrize("comm", COMMS)
def test_the_same_failure_everywhere_is_raised_as_it_is(comm):
    fn = fail_on(range(comm.size), comm, lambda rank: "data.train: missing")
    assert raised_everywhere(comm, fn) == "data.train: missing"


@pytest.mark.parametrize("comm", COMMS)
def test_one_failing_rank_is_named_on_every_rank(comm):
    last = comm.size - 1
    message = raised_everywhere(comm, fail_on((last,), comm, lambda rank: f"bad row on {rank}"))
    expected = f"bad row on {last}"
    assert message == (expected if comm.size == 1 else f"[rank {last}] {expected}")


@pytest.mark.mpi(min_size=3)
def test_different_failures_give_the_lowest_failing_ranks_message():
    comm = MPI.COMM_WORLD
    message = raised_everywhere(comm, fail_on((1, 2), comm, lambda rank: f"problem {rank}"))
    assert message == "[rank 1] problem 1"
