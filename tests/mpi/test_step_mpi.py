"""The data-parallel step, in process, against plain NumPy SGD on the global batch.

Each rank holds B rows of one global batch (rank 0's rows, then rank 1's, ...); a step must
equal one serial SGD step on all size*B rows (tests/reference.py, which shares no code with
mpifed's model, loss or optimiser), and return the same global mean loss on every rank.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI
from reference import initial_weights, mlp_sgd

from mpifed.errors import UserError
from mpifed.nn.models import ModelSpec, init_params
from mpifed.optim import make_optimizer
from mpifed.train.config import resolve
from mpifed.train.step import DataParallelStep

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs

FEATURES, HIDDEN, CLASSES, BATCH, SEED = 6, 5, 3, 4, 11


@pytest.fixture(params=["self", "world"])
def comm(request):
    return MPI.COMM_SELF if request.param == "self" else MPI.COMM_WORLD


def optimizer(momentum: float):
    optim = resolve({"data": {"train": "d.h5"},
                     "optim": {"name": "sgd", "momentum": momentum}}).optim
    return make_optimizer(optim)


def global_data(ranks: int, steps: int):
    """The same data on every rank: `steps` global batches of ranks*BATCH rows."""
    rng = np.random.default_rng(5)
    rows = steps * ranks * BATCH
    y = rng.integers(0, CLASSES, size=rows)
    return rng.standard_normal((rows, FEATURES)) + y[:, None], y


def one_step_setup(comm):
    """Return (x, y, spec, params, reference weights, this rank's rows) for one global batch."""
    x, y = global_data(comm.size, 1)
    spec = ModelSpec("mlp", FEATURES, (HIDDEN,), CLASSES)
    params = init_params(spec, SEED, dtype="float64")
    mine = np.arange(comm.rank * BATCH, (comm.rank + 1) * BATCH)
    return x, y, spec, params, initial_weights(FEATURES, HIDDEN, CLASSES, SEED), mine


def serial_loss(weights, x, y) -> float:
    """Mean cross-entropy of the 1-hidden-layer ReLU MLP (plain NumPy)."""
    w1, b1, w2, b2 = weights
    out = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    top = out.max(1, keepdims=True)
    log_sum = np.log(np.exp(out - top).sum(1)) + top[:, 0]
    return float(np.mean(log_sum - out[np.arange(len(y)), y]))


@pytest.mark.parametrize("algorithm,overlap", [("ring", False), ("mpi", False),
                                               ("hierarchical", False), ("ring", True)])
def test_steps_equal_serial_sgd_on_the_global_batch(comm, algorithm, overlap):
    steps, lr, momentum = 3, 0.1, 0.9
    x, y = global_data(comm.size, steps)
    spec = ModelSpec("mlp", FEATURES, (HIDDEN,), CLASSES)
    params = init_params(spec, SEED, dtype="float64")
    start = weights = initial_weights(FEATURES, HIDDEN, CLASSES, SEED)
    batches = np.arange(steps * comm.size * BATCH).reshape(steps, comm.size * BATCH)
    step = DataParallelStep(spec, params, comm, algorithm, np, overlap, stall_timeout=0)
    opt = optimizer(momentum)
    try:
        for t, batch in enumerate(batches):
            mine = batch[comm.rank * BATCH:(comm.rank + 1) * BATCH]
            loss = step(x[mine], y[mine], opt, lr, t + 1)
            assert loss == pytest.approx(serial_loss(weights, x[batch], y[batch]), rel=1e-12)
            assert comm.allgather(loss) == [loss] * comm.size  # the same on every rank
            weights = mlp_sgd(x, y, start, batches[:t + 1], lr, momentum)  # steps 1..t+1
            np.testing.assert_allclose(params, np.concatenate([w.ravel() for w in weights]),
                                       rtol=1e-10, atol=1e-12)
        assert not step.stop_agreed
    finally:
        step.close()
    step.free()


def test_fedprox_anchor_and_a_stop_on_one_rank(comm):
    x, y, spec, params, weights, mine = one_step_setup(comm)
    anchor = [w + 0.3 for w in weights]
    step = DataParallelStep(spec, params, comm, "ring", np, False, stall_timeout=0)
    stop = 1.0 if comm.rank == comm.size - 1 else 0.0
    step(x[mine], y[mine], optimizer(0.0), 0.2, 1,
         np.concatenate([a.ravel() for a in anchor]), 0.7, stop=stop)
    expected = mlp_sgd(x, y, weights, [np.arange(comm.size * BATCH)], 0.2, 0.0, anchor, 0.7)
    np.testing.assert_allclose(params, np.concatenate([w.ravel() for w in expected]),
                               rtol=1e-10, atol=1e-12)
    assert step.stop_agreed  # the last rank asked; every rank knows after the step
    step.close()
    step.free()


def test_a_diverged_loss_is_raised_on_every_rank(comm):
    x, y, spec, params, _, mine = one_step_setup(comm)
    if comm.rank == 0:
        params[0] = np.inf  # one rank's loss is not finite: the mean is not either
    step = DataParallelStep(spec, params, comm, "ring", np, False, stall_timeout=0)
    with pytest.raises(UserError, match="training diverged: the loss is .* at step 4"), \
            np.errstate(invalid="ignore", over="ignore"):
        step(x[mine], y[mine], optimizer(0.0), 0.1, 4)
    step.close()
    step.free()
