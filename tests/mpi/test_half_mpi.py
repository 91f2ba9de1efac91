"""16-bit floats on an MPI without a half type (Open MPI), against hand-rounded sums and MPICH.

Every collective moves float16 as raw 16-bit words; MPI_Allreduce and MPI_Reduce_scatter add
them in mpifed's user operation where the library cannot (MPIFED_MPI_HALF=0 forces that path
under MPICH). On two ranks every algorithm's sum is the one correctly rounded a + b.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from test_collectives_mpi import HALVES, assert_same_on_all_ranks

from mpifed.comm import allgather, allreduce, reduce_scatter
from mpifed.comm.datatypes import mpi_sums, reduction, wire
from mpifed.comm.native import mpi_allreduce, mpi_reduce_scatter

pytestmark = pytest.mark.mpi(min_size=1)

ALGORITHMS = ["ring", "mpi", "hierarchical"]


def halves(n: int, rank: int) -> np.ndarray:
    """Rank `rank`'s float16 values: wide-ranging, so that many sums round."""
    rng = np.random.default_rng([7, rank, n])
    return (rng.standard_normal(n) * 2.0 ** rng.integers(-8, 8, n)).astype(np.float16)


@pytest.fixture
def pair():
    """A communicator of world ranks 0 and 1 (None on the others), freed afterwards."""
    world = MPI.COMM_WORLD
    comm = world.Split(0 if world.rank < 2 else MPI.UNDEFINED, world.rank)
    yield None if comm == MPI.COMM_NULL else comm
    if comm != MPI.COMM_NULL:
        comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_two_ranks_sum_is_the_rounded_pair_sum(pair, algorithm, dtype):
    if pair is None:
        return  # ranks 2 and 3 sit this one out
    n = 50_001
    mine, other = halves(n, pair.rank), halves(n, 1 - pair.rank)
    by_hand = (mine.astype(np.float64) + other.astype(np.float64)).astype(np.float16)
    got = allreduce(mine.copy(), pair, algorithm=algorithm)
    np.testing.assert_array_equal(got.view(np.uint16), by_hand.view(np.uint16))
    chunk = reduce_scatter(mine.copy(), pair, algorithm=algorithm)
    lo = 0 if pair.rank == 0 else n - chunk.size
    np.testing.assert_array_equal(chunk.view(np.uint16), by_hand[lo:lo + chunk.size].view(np.uint16))


@pytest.mark.parametrize("algorithm", ALGORITHMS + ["auto"])
@pytest.mark.parametrize("dtype", HALVES)
def test_allgather_moves_the_bits(algorithm, dtype):
    comm = MPI.COMM_WORLD
    whole = np.concatenate([halves(1000, r) for r in range(comm.size)])
    whole[::97] = np.float16("nan")  # NaN payloads and infinities pass unchanged
    whole[1::97] = np.float16("inf")
    buf = np.zeros_like(whole)
    lo, hi = 1000 * comm.rank, 1000 * (comm.rank + 1)
    buf[lo:hi] = whole[lo:hi]
    bounds = [(1000 * r, 1000 * (r + 1)) for r in range(comm.size)]
    allgather(buf, comm, algorithm=algorithm, bounds=bounds)
    assert buf.tobytes() == whole.tobytes()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("n", [1, 5, 100_003])
def test_user_operation_gives_the_library_half_sum_bitwise(n, monkeypatch):
    """Where the MPI sums float16 itself (MPICH), our operation over raw words gives its bits."""
    if not mpi_sums(np.float16):
        pytest.skip("this MPI has no half type: the user operation is the only path")
    mine = halves(n, MPI.COMM_WORLD.rank)
    native = mpi_allreduce(mine.copy(), MPI.COMM_WORLD)
    native_chunk = mpi_reduce_scatter(mine.copy(), MPI.COMM_WORLD).copy()
    monkeypatch.setenv("MPIFED_MPI_HALF", "0")
    mpi_sums.cache_clear()
    try:
        words, op = reduction(mine)
        assert op != MPI.SUM and words.dtype == np.uint16
        ours = mpi_allreduce(mine.copy(), MPI.COMM_WORLD)
        ours_chunk = mpi_reduce_scatter(mine.copy(), MPI.COMM_WORLD)
    finally:
        monkeypatch.undo()
        mpi_sums.cache_clear()
    assert ours.tobytes() == native.tobytes()
    assert ours_chunk.tobytes() == native_chunk.tobytes()
    assert_same_on_all_ranks(ours)


def test_wire_views_only_16_bit_floats():
    values = np.arange(6, dtype=np.float16)
    assert wire(values).dtype == np.uint16 and np.shares_memory(wire(values), values)
    for dtype in ("float32", "float64", "int32", "int64", "int16", "uint16"):
        array = np.zeros(3, dtype)
        assert wire(array) is array


@pytest.mark.mpi(min_size=2)
def test_bfloat16_sums_on_two_ranks_through_the_ring_and_mpi(pair):
    """bfloat16 (ml_dtypes) has no MPI type anywhere: the raw words and our adds carry it."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    if pair is None:
        return
    from mpifed.comm.ring import allgather_steps, chunk_bounds, reduce_scatter_steps, ring_order

    bf16 = np.dtype(ml_dtypes.bfloat16)
    mine, other = (halves(20_001, r).astype(np.float32).astype(bf16) for r in
                   (pair.rank, 1 - pair.rank))
    by_hand = (mine.astype(np.float64) + other.astype(np.float64)).astype(bf16)
    assert not mpi_sums(bf16)
    words, op = reduction(mine.copy())
    pair.Allreduce(MPI.IN_PLACE, words, op=op)
    assert words.tobytes() == by_hand.tobytes()
    ring = mine.copy()
    chunks = ring_order(chunk_bounds(ring.size, pair.size))
    reduce_scatter_steps(ring, pair, chunks)
    allgather_steps(ring, pair, chunks)
    assert ring.tobytes() == by_hand.tobytes()


def test_a_datatype_the_library_lacks_is_summed_by_our_operation(monkeypatch):
    """mpi4py's PyPI wheel names MPI.FLOAT16_T for Open MPI, which Open MPI 4.1 does not have:
    its first use raises MPI_ERR_TYPE. mpi_sums must then say no (our operation sums), not
    fail; the stand-in raises as Open MPI 4.1.4 did."""
    import mpi4py.util.dtlib as dtlib

    def lacking(dtype):
        raise MPI.Exception(MPI.ERR_TYPE)

    monkeypatch.setattr(dtlib, "from_numpy_dtype", lacking)
    mpi_sums.cache_clear()
    try:
        assert not mpi_sums(np.float16)
        words, op = reduction(halves(9, MPI.COMM_WORLD.rank))
        assert words.dtype == np.uint16 and op != MPI.SUM
    finally:
        monkeypatch.undo()
        mpi_sums.cache_clear()
    assert mpi_sums(np.float32)  # a type every MPI has: checked, and its duplicate freed
