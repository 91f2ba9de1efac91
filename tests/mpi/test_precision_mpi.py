"""Mixed precision on 2-4 ranks: a gradient overflow on one rank (MPIFED_FAULT=overflow) is
skipped by every rank at the same step, for every comm.shard stage with and without overlap:
the parameters (running statistics included) and the optimiser state stay bit for bit as they
were, the same on every rank, and the loss scale halves on every rank."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed import faults
from mpifed.nn.layers import BatchNorm2d, Conv2d, GlobalAvgPool, Linear, ReLU, Residual
from mpifed.nn.sequential import Sequential
from mpifed.optim import Adam
from mpifed.optim.loss_scale import LossScaler
from mpifed.train.precision import MixedPrecision
from mpifed.train.sharded_step import STEPS

pytestmark = pytest.mark.mpi(min_size=2)

SKIPPED = 3  # the step whose gradients overflow on the last rank


def convnet() -> Sequential:
    """A small convnet with synchronised batch norm (running statistics in the flat buffer)."""
    return Sequential([
        Conv2d(3, 3, padding=1), ReLU(), BatchNorm2d(sync=True),
        Residual([Conv2d(3, 3, padding=1), ReLU(), BatchNorm2d(sync=True)]),
        GlobalAvgPool(), Linear(3)], (3, 5, 5), 3)


def batches(spec, steps: int, per_rank: int = 4):
    comm = MPI.COMM_WORLD
    rng = np.random.default_rng(7)
    for _ in range(steps):
        x = rng.standard_normal((per_rank * comm.size, *spec.input_shape)).astype(np.float32)
        y = rng.integers(0, spec.num_classes, per_rank * comm.size)
        rows = slice(comm.rank * per_rank, (comm.rank + 1) * per_rank)
        yield x[rows], y[rows]


def snapshot(step_fn, optimizer) -> tuple:
    """The whole parameters (collective for ZeRO-3) and a copy of this rank's optimiser state."""
    params = np.array(step_fn.gather_params(), copy=True)
    state = {k: np.array(v, copy=True) for k, v in optimizer.state().items()}
    return params, state


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("stage", list(STEPS))
def test_overflow_on_one_rank_is_skipped_by_every_rank(stage, overlap, monkeypatch):
    comm = MPI.COMM_WORLD
    monkeypatch.setenv(faults.ENV, f"overflow:step={SKIPPED}:rank={comm.size - 1}")
    spec = convnet()
    precision = MixedPrecision(spec, np.float16, LossScaler(1024.0, growth_interval=100), np)
    step_fn = STEPS[stage](spec, spec.init(2), comm, "ring", np, overlap, stall_timeout=0,
                           precision=precision)
    optimizer = Adam()
    try:
        for number, (x, y) in enumerate(batches(spec, 5), start=1):
            before, state = snapshot(step_fn, optimizer)
            loss = step_fn(x, y, optimizer, 0.01, number)
            after, state_after = snapshot(step_fn, optimizer)
            skipped = comm.allgather(step_fn.skipped)
            assert skipped == [number == SKIPPED] * comm.size, (number, skipped)
            assert np.isfinite(loss)
            everyone = comm.allgather(after.tobytes())  # the same model on every rank
            assert everyone == [everyone[0]] * comm.size
            assert comm.allgather(precision.scaler.scale) == \
                [1024.0 if number < SKIPPED else 512.0] * comm.size
            if number == SKIPPED:
                np.testing.assert_array_equal(after, before)  # buffers included
                assert state_after.keys() == state.keys()
                for key in state:
                    np.testing.assert_array_equal(state_after[key], state[key])
            else:
                assert not np.array_equal(after, before)
        assert optimizer.t == 4  # one update per step taken
        assert precision.scaler.skipped == 1
    finally:
        step_fn.close()
