"""PowerSGD over the package's ring on whatever rank count mpiexec gave (1 to 4): every rank ends
with the same bytes, equal to the same ranks simulated in one process (tests/simulated_ranks.py).
"""

from __future__ import annotations

import hashlib
from math import prod

import numpy as np
import pytest
from mpi4py import MPI
from simulated_ranks import SimulatedRanks

from mpifed.comm import mpi_allreduce, ring_allreduce
from mpifed.comm.compression.powersgd import PowerSGD

pytestmark = pytest.mark.mpi(min_size=1)

# An MLP 12-32-16-4 as mpifed stores it (W (in, out), marked transposed) and a conv with bias.
LAYOUT = [((6, 3, 3, 3), False), ((6,), False), ((12, 32), True), ((32,), False),
          ((32, 16), True), ((16,), False), ((16, 4), True), ((4,), False)]
STEPS, START = 5, 2


def blocks_and_length():
    blocks, at = [], 0
    for shape, transposed in LAYOUT:
        blocks.append((at, shape, transposed))
        at += prod(shape)
    return blocks, at


def grads_of(rank: int, length: int, dtype) -> list:
    """Return rank `rank`'s gradient for every step: the same on any rank that asks."""
    rng = np.random.default_rng([rank, 42])
    return [rng.standard_normal(length).astype(dtype) for _ in range(STEPS)]


def run(psgd, grads, ranges, allreduce_sum, size: int) -> list:
    """Return the reduced gradient of each step, reducing `ranges` one by one."""
    out = []
    for k, g in enumerate(grads):
        g = g.copy()
        for lo, hi in ranges:
            psgd.reduce_mean(g[lo:hi], lo, allreduce_sum, size, k + 1)
        out.append(g)
    return out


def digest(arrays) -> str:
    return hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layer_wise", [False, True], ids=["whole", "layer-wise"])
@pytest.mark.parametrize("collective", ["ring", "mpi"])
def test_every_rank_ends_alike_and_as_the_simulated_ranks(collective, layer_wise, dtype):
    comm = MPI.COMM_WORLD
    blocks, length = blocks_and_length()
    ranges = [(o, o + prod(s)) for o, s, _ in blocks] if layer_wise else [(0, length)]
    sum_of = {"ring": lambda buf: ring_allreduce(buf, comm),
              "mpi": lambda buf: mpi_allreduce(buf, comm)}[collective]
    psgd = PowerSGD(blocks, rank=2, start=START, dtype=dtype)
    got = run(psgd, grads_of(comm.rank, length, dtype), ranges, sum_of, comm.size)

    assert len(set(comm.allgather(digest(got)))) == 1, "the ranks' results differ"
    assert len(set(comm.allgather(digest(psgd.state()["q"])))) == 1, "the ranks' Qs differ"

    simulated = [PowerSGD(blocks, rank=2, start=START, dtype=dtype) for _ in range(comm.size)]
    want = SimulatedRanks(comm.size).run(
        lambda r, sim_sum: run(simulated[r], grads_of(r, length, dtype), ranges, sim_sum,
                               comm.size))[comm.rank]
    tol = 1e-5 if dtype == "float32" else 1e-12  # the ring sums in another order
    for k in range(STEPS):
        np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol, err_msg=f"step {k + 1}")
    np.testing.assert_allclose(psgd.state()["error"], simulated[comm.rank].state()["error"],
                               rtol=tol, atol=tol)
    assert psgd.bytes_sent() == simulated[comm.rank].bytes_sent()
    if comm.size > 1:
        assert psgd.uncompressed_bytes() / psgd.bytes_sent() > 1
