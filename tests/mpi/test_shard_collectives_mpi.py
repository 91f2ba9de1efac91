"""reduce_scatter and allgather against MPI.Reduce_scatter / MPI.Allgatherv (1 to 4 ranks)."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from test_collectives_mpi import (
    DTYPES,
    FLOATS,
    LENGTHS,
    assert_same_on_all_ranks,
    rank_data,
    tolerance,
)

from mpifed.comm import allgather, allreduce, chunk_bounds, reduce_scatter, shared_array
from mpifed.comm.topology import topology

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs

SHARD_ALGORITHMS = ["ring", "mpi", "hierarchical", "auto"]


def host(buf):
    return np.asarray(buf.get() if hasattr(buf, "get") else buf)


def reference_chunk(buf, comm, op="sum"):
    """Return MPI.Reduce_scatter's chunk of this rank, in float64 for floats."""
    data = host(buf)
    wide = data.astype(np.float64 if data.dtype.kind == "f" else data.dtype)
    counts = [b - a for a, b in chunk_bounds(wide.size, comm.size)]
    out = np.empty(counts[comm.rank], dtype=wide.dtype)
    comm.Reduce_scatter(wide, out, counts, op=MPI.SUM)
    return out / comm.size if op == "mean" else out


def assert_close(got, expected, dtype):
    if np.dtype(dtype).kind == "i":
        np.testing.assert_array_equal(got, expected)
    else:
        rtol = tolerance(dtype)
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=rtol, atol=rtol * 4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("algorithm", SHARD_ALGORITHMS)
def test_reduce_scatter_matches_mpi(algorithm, n, dtype, xp):
    comm = MPI.COMM_WORLD
    buf = rank_data(n, dtype, xp)
    expected = reference_chunk(buf, comm)
    chunk = reduce_scatter(buf, comm, algorithm=algorithm)
    lo, hi = chunk_bounds(n, comm.size)[comm.rank]
    assert chunk.shape == (hi - lo,)
    if hi > lo:  # a view of buf at the chunk's place
        assert host(buf[lo:hi]).tobytes() == host(chunk).tobytes()
        chunk[...] = 0
        assert not host(buf[lo:hi]).any()
        chunk[...] = xp.asarray(expected.astype(dtype))
    assert_close(host(buf[lo:hi]), expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("algorithm", SHARD_ALGORITHMS)
def test_allgather_matches_mpi_allgatherv(algorithm, n, dtype, xp):
    comm = MPI.COMM_WORLD
    bounds = chunk_bounds(n, comm.size)
    lo, hi = bounds[comm.rank]
    mine = host(rank_data(n, dtype, np, seed=5))[lo:hi].copy()
    expected = np.empty(n, dtype=dtype)
    words = np.uint16 if dtype == "float16" else dtype  # the bits: Open MPI has no half type
    comm.Allgatherv(mine.view(words),
                    [expected.view(words), ([b - a for a, b in bounds], [a for a, _ in bounds])])
    buf = xp.asarray(np.full(n, 7, dtype=dtype))  # garbage outside the own chunk
    buf[lo:hi] = xp.asarray(mine)
    out = allgather(buf, comm, algorithm=algorithm)
    assert out is buf
    assert host(buf).tobytes() == expected.tobytes()


@pytest.mark.parametrize("algorithm", SHARD_ALGORITHMS)
def test_reduce_scatter_then_allgather_is_allreduce_bitwise(algorithm):
    comm = MPI.COMM_WORLD
    buf = rank_data(100_003, "float32", np, seed=2)
    whole = allreduce(buf.copy(), comm, algorithm=algorithm)
    reduce_scatter(buf, comm, algorithm=algorithm)
    allgather(buf, comm, algorithm=algorithm)
    assert_same_on_all_ranks(buf)
    if algorithm == "ring":  # literally the same code
        assert buf.tobytes() == whole.tobytes()
    else:
        np.testing.assert_allclose(buf, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("algorithm", SHARD_ALGORITHMS)
def test_reduce_scatter_mean(algorithm, dtype):
    comm = MPI.COMM_WORLD
    buf = rank_data(1001, dtype, np, seed=1)
    expected = reference_chunk(buf, comm, op="mean")
    chunk = reduce_scatter(buf, comm, op="mean", algorithm=algorithm)
    rtol = tolerance(dtype)
    np.testing.assert_allclose(chunk.astype(np.float64), expected, rtol=rtol, atol=rtol)


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("fn", ["reduce_scatter", "allgather"])
@pytest.mark.parametrize("algorithm", SHARD_ALGORITHMS)
def test_mismatch_raises_the_same_error_everywhere(fn, algorithm):
    comm = MPI.COMM_WORLD
    call = reduce_scatter if fn == "reduce_scatter" else allgather
    with pytest.raises(ValueError, match="different lengths") as info:
        call(np.ones(10 + comm.rank, dtype=np.float32), comm, algorithm=algorithm)
    assert len(set(comm.allgather(str(info.value)))) == 1
    dtype = np.float64 if comm.rank == comm.size - 1 else np.float32
    with pytest.raises(ValueError, match="different dtypes"):
        call(np.ones(8, dtype=dtype), comm, algorithm=algorithm)


def test_unknown_algorithm_is_refused():
    with pytest.raises(ValueError, match="nccl"):
        reduce_scatter(np.ones(4), MPI.COMM_SELF, algorithm="nccl")


@pytest.mark.parametrize("emulated_nodes", [1, 2], indirect=True, ids=["1-per-node", "2-per-node"])
@pytest.mark.parametrize("n", [0, 1, 3, 5, 97, 100_003])
def test_hierarchical_halves_across_emulated_nodes(emulated_nodes, n):
    comm = emulated_nodes
    buf = rank_data(n, "float64", np, seed=4)
    expected = reference_chunk(buf, comm)
    chunk = reduce_scatter(buf, comm, algorithm="hierarchical")
    np.testing.assert_allclose(chunk, expected, rtol=1e-12, atol=1e-12)
    full = np.empty(n)
    bounds = chunk_bounds(n, comm.size)
    comm.Allgatherv(np.ascontiguousarray(chunk), [full, ([b - a for a, b in bounds],
                                                         [a for a, _ in bounds])])
    allgather(buf, comm, algorithm="hierarchical")
    assert buf.tobytes() == full.tobytes()


@pytest.mark.parametrize("check", [True, False])
def test_hierarchical_halves_on_shared_arrays(check):
    world = MPI.COMM_WORLD
    node, _ = topology(world)
    buf = shared_array(70_001, "float32", node)
    buf[...] = rank_data(70_001, "float32", np, seed=3)
    expected = reference_chunk(buf, world)
    chunk = reduce_scatter(buf, world, algorithm="hierarchical", check=check)
    np.testing.assert_allclose(chunk, expected, rtol=tolerance("float32"), atol=1e-5)
    lo, hi = chunk_bounds(buf.size, world.size)[world.rank]
    buf[:lo] = -1
    buf[hi:] = -1
    allgather(buf, world, algorithm="hierarchical", check=check)
    assert_same_on_all_ranks(buf)
    np.testing.assert_allclose(buf[lo:hi], expected, rtol=tolerance("float32"), atol=1e-5)
