"""The collectives against MPI.Allreduce, on whatever rank count mpiexec gave (1 to 4)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm import (
    allreduce,
    chunk_bounds,
    hierarchical_allreduce,
    mpi_allreduce,
    ring_allreduce,
    shared_array,
)
from mpifed.comm.topology import topology

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs

LENGTHS = [0, 1, 2, 3, 5, 7, 13, 97, 1000, 65_537, 1_048_583]  # fewer than ranks, primes, big
# float16 twice: with the MPI's own half type where it has one (MPICH), then with that type
# forced away, as on Open MPI (raw 16-bit words, summed by mpifed): MPICH CI runs both paths.
HALVES = ["float16", pytest.param("float16", id="float16-no-mpi-half",
                                  marks=pytest.mark.no_mpi_half)]
FLOATS = [*HALVES, "float32", "float64"]
DTYPES = [*FLOATS, "int32", "int64"]


def rank_data(n: int, dtype: str, xp, seed: int = 0):
    """Return this rank's test buffer: distinct per rank, small enough not to overflow."""
    rng = np.random.default_rng([seed, MPI.COMM_WORLD.rank, n])
    if np.dtype(dtype).kind == "f":
        host = rng.standard_normal(n).astype(dtype)
    else:
        host = rng.integers(-1000, 1000, size=n).astype(dtype)
    return xp.asarray(host)


def reference(buf, op="sum"):
    """Return MPI.Allreduce's result on a host copy, in float64 for floats."""
    host = np.asarray(buf.get() if hasattr(buf, "get") else buf)
    wide = host.astype(np.float64 if host.dtype.kind == "f" else host.dtype)
    MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, wide, op=MPI.SUM)
    return wide / MPI.COMM_WORLD.size if op == "mean" else wide


def assert_same_on_all_ranks(buf):
    """Assert the bytes of `buf` are identical on every rank (compare with rank 0's)."""
    host = np.ascontiguousarray(buf.get() if hasattr(buf, "get") else buf)
    root = MPI.COMM_WORLD.bcast(host.tobytes(), root=0)
    assert host.tobytes() == root, "ranks ended with different bytes"


def tolerance(dtype: str) -> float:
    """Absolute tolerance for a sum of `size` standard-normal values in `dtype`."""
    eps = float(np.finfo(dtype).eps)
    return 4 * eps * MPI.COMM_WORLD.size * 4.0  # |values| < ~4 in the partial sums


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", LENGTHS)
@pytest.mark.parametrize("fn", [ring_allreduce, mpi_allreduce, hierarchical_allreduce],
                         ids=["ring", "mpi", "hierarchical"])
def test_sum_matches_mpi_allreduce(fn, n, dtype, xp):
    buf = rank_data(n, dtype, xp)
    expected = reference(buf)
    out = fn(buf, MPI.COMM_WORLD)
    assert out is buf
    got = np.asarray(out.get() if hasattr(out, "get") else out)
    if np.dtype(dtype).kind == "i":
        np.testing.assert_array_equal(got, expected)
    else:
        # float16 sums are rounded after each add: scale by magnitude as well as rank count.
        rtol = tolerance(dtype)
        np.testing.assert_allclose(got.astype(np.float64), expected, rtol=rtol, atol=rtol * 4)
    assert_same_on_all_ranks(out)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "hierarchical", "auto"])
def test_mean_divides_by_rank_count(algorithm, dtype, xp):
    buf = rank_data(1001, dtype, xp, seed=1)
    expected = reference(buf, op="mean")
    allreduce(buf, MPI.COMM_WORLD, op="mean", algorithm=algorithm)
    got = np.asarray(buf.get() if hasattr(buf, "get") else buf).astype(np.float64)
    rtol = tolerance(dtype)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


def test_all_ones_sum_is_exact_count():
    # baidu-allreduce's test: all-ones buffers sum to exactly the rank count, on every element.
    buf = np.ones(3 * 1024 * 1024 + 5, dtype=np.float32)
    ring_allreduce(buf, MPI.COMM_WORLD, segment_bytes=64 * 1024)
    assert np.all(buf == MPI.COMM_WORLD.size)


@pytest.mark.mpi(min_size=2)
def test_mismatched_lengths_raise_on_every_rank():
    comm = MPI.COMM_WORLD
    buf = np.ones(10 + comm.rank, dtype=np.float32)
    with pytest.raises(ValueError, match="different lengths") as info:
        ring_allreduce(buf, comm)
    messages = comm.allgather(str(info.value))
    assert len(set(messages)) == 1, "ranks raised different messages"


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("algorithm", ["ring", "mpi", "hierarchical", "auto"])
def test_mismatched_dtypes_raise_on_every_rank(algorithm):
    comm = MPI.COMM_WORLD
    dtype = np.float64 if comm.rank == comm.size - 1 else np.float32
    with pytest.raises(ValueError, match="different dtypes"):
        allreduce(np.ones(8, dtype=dtype), comm, algorithm=algorithm)


def test_ring_on_a_subcommunicator():
    # Rank groups (institutions) run their own rings concurrently.
    world = MPI.COMM_WORLD
    sub = world.Split(world.rank % 2, world.rank)
    buf = np.full(1234, float(world.rank), dtype=np.float64)
    ring_allreduce(buf, sub)
    members = [r for r in range(world.size) if r % 2 == world.rank % 2]
    assert np.all(buf == float(sum(members)))
    sub.Free()


def test_comm_self_is_identity():
    buf = np.arange(17, dtype=np.float32)
    ring_allreduce(buf, MPI.COMM_SELF, op="mean")
    np.testing.assert_array_equal(buf, np.arange(17, dtype=np.float32))


def test_chunk_bounds_cover_the_buffer():
    for length in [0, 1, 3, 10, 11]:
        for parts in [1, 2, 3, 4]:
            bounds = chunk_bounds(length, parts)
            assert bounds[0][0] == 0 and bounds[-1][1] == length
            sizes = [b - a for a, b in bounds]
            assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize("emulated_nodes", [1, 2], indirect=True, ids=["1-per-node", "2-per-node"])
@pytest.mark.parametrize("op", ["sum", "mean"])
def test_hierarchical_across_emulated_nodes(emulated_nodes, op):
    comm = emulated_nodes
    node, cross = topology(comm)
    per_node = int(os.environ["MPIFED_RANKS_PER_NODE"])
    uneven = comm.size > per_node and comm.size % per_node != 0
    assert (cross is None) == uneven  # uneven nodes fall back to the ring
    buf = rank_data(100_003, "float64", np)
    expected = reference(buf, op)
    hierarchical_allreduce(buf, comm, op)
    np.testing.assert_allclose(buf, expected, rtol=1e-12, atol=1e-12)
    assert_same_on_all_ranks(buf)


@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_hierarchical_on_shared_arrays_reduces_in_place(dtype):
    world = MPI.COMM_WORLD
    node, _ = topology(world)
    buf = shared_array(70_001, dtype, node)
    buf[...] = rank_data(70_001, dtype, np, seed=3)
    expected = reference(buf)
    out = allreduce(buf, world, algorithm="hierarchical")
    assert out is buf
    if np.dtype(dtype).kind == "i":
        np.testing.assert_array_equal(buf, expected)
    else:
        np.testing.assert_allclose(buf, expected, rtol=tolerance(dtype), atol=1e-5)
    assert_same_on_all_ranks(buf)
    # Buffers on different ranks at different places: the copy path, same answer.
    other = rank_data(70_001, dtype, np, seed=3) if world.rank % 2 else buf.copy()
    if world.rank % 2 == 0:
        other[...] = rank_data(70_001, dtype, np, seed=3)
    allreduce(other, world, algorithm="hierarchical")
    np.testing.assert_allclose(other.astype(np.float64), expected, rtol=1e-5, atol=1e-3)
