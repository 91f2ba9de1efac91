"""Synchronised batch norm on p ranks equals batch norm on the global batch (any p, 1 to 4)."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.nn.layers import BatchNorm2d, Context

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs


def reducer(comm):
    def reduce(a):
        comm.Allreduce(MPI.IN_PLACE, a, op=MPI.SUM)
        return a
    return reduce


@pytest.mark.parametrize("shape,rows", [((3, 5, 4), 3), ((6,), 2)])
def test_sync_batchnorm_equals_global_batch(shape, rows):
    comm = MPI.COMM_WORLD
    p_ranks, rank = comm.size, comm.rank
    rng = np.random.default_rng(11)  # the same global data on every rank
    x = rng.standard_normal((rows * p_ranks, *shape)) * 2 + 0.5
    r = rng.standard_normal(x.shape)
    c = shape[0]
    params = {"gamma": 1 + 0.3 * rng.standard_normal(c), "beta": rng.standard_normal(c),
              "running_mean": rng.standard_normal(c), "running_var": 1 + rng.random(c)}

    def run(layer, x, r, ctx):
        layer.build(shape, "model.layers[0]")
        g = {k: np.zeros(c) for k in params}
        y = layer.forward(params, x, ctx)
        dx = layer.backward(params, g, r, ctx)
        return y, dx, g

    y, dx, g = run(BatchNorm2d(sync=False), x, r, Context())  # serial, the global batch
    mine = slice(rank * rows, (rank + 1) * rows)
    ys, dxs, gs = run(BatchNorm2d(sync=True), x[mine], r[mine], Context(reduce=reducer(comm)))
    np.testing.assert_allclose(ys, y[mine], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dxs, dx[mine], rtol=1e-10, atol=1e-12)
    for name in ("gamma", "beta"):  # this rank's share; the sum over ranks is the serial one
        total = comm.allreduce(gs[name], op=MPI.SUM)
        np.testing.assert_allclose(total, g[name], rtol=1e-10, atol=1e-12)
    for name in ("running_mean", "running_var"):  # the same new statistics on every rank
        np.testing.assert_allclose(gs[name], g[name], rtol=1e-12)
