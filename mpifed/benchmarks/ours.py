"""Ours: mpifed's data-parallel training step as a callable for the harness, built from the
pieces `mpifed train` wires (train/setup.py: backend, BLAS threads, shard, model, step, loader),
so a benchmark step is the training loop's step: batch, learning rate, gradient, all-reduce,
update. What the loop does around it (logging, checkpoints, the model file) is left out, as
the peers leave it out.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
from threadpoolctl import threadpool_limits

from ..comm.agree import raise_together
from ..optim import learning_rate, make_optimizer
from ..train.precision import make_precision
from ..train.setup import (
    array_backend,
    batch_loader,
    blas_threads_per_rank,
    build_model,
    open_checked_shard,
    plan_steps,
)
from ..train.step import make_step
from .harness import Steps, barrier_sync


@contextmanager
def training_steps(cfg, comm):
    """Yield the Steps of data-parallel training as `cfg` (a Config) describes, on
    `comm` (collective); BLAS threads are limited as `mpifed train` limits them meanwhile."""
    xp = array_backend(cfg.comm, comm)
    with threadpool_limits(limits=blas_threads_per_rank(comm)):
        step_fn, loader, step = _build(cfg, comm, xp)
        device_sync = xp.cuda.get_current_stream().synchronize if xp is not np else None
        try:
            yield Steps(step, barrier_sync(comm, device_sync), lambda: step_fn.comm_seconds)
        finally:
            loader.close()
            step_fn.close()
        step_fn.free()  # collective: only on the path every rank takes


def _build(cfg, comm, xp):
    """Return (step_fn, loader, step) as run_data_parallel builds them, from step 0."""
    data, optim, seed = cfg.data, cfg.optim, cfg.run.seed
    dtype = np.dtype(cfg.model.dtype)
    shard, classes = open_checked_shard(comm, data.train, data.x, data.y, dtype, "data.train")
    spec, params = raise_together(comm, lambda: build_model(
        cfg.model, seed, shard.info.input_shape, classes, xp, dtype, cfg.comm.shard))
    per_epoch, total = plan_steps(optim, len(shard), comm)
    optimizer = make_optimizer(optim)
    precision = raise_together(comm, lambda: make_precision(cfg.model, optim, spec, dtype, xp))
    step_fn = make_step(spec, params, comm, cfg.comm, xp, dtype, precision)
    loader = batch_loader(data, optim.batch_size, seed, shard, per_epoch, comm.rank, 0, xp)

    def step(i: int) -> None:
        _, x, y = loader.get()
        lr = learning_rate(i, optim.lr, total, optim.schedule, optim.warmup,
                           optim.step_size, optim.gamma)
        step_fn(x, y, optimizer, lr, i + 1)

    return step_fn, loader, step
