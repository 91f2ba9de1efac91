"""`train(cfg, comm)`: the one entry point; it chooses the data-parallel or the federated loop.

    mpiexec -n 4 mpifed train run.toml                  # data-parallel
    mpiexec -n 4 mpifed train fed.toml                  # with a [federated] section

Both loops build on `setup.py`; neither imports the other.
"""

from __future__ import annotations

import time

from mpi4py import MPI
from threadpoolctl import threadpool_limits

from ..comm.agree import raise_together
from ..log import get_logger
from .inputs import NO_INPUTS
from .launch_check import check_launch
from .precision import check_levers
from .run_lock import RunLock
from .setup import array_backend, naming_moved_files, thread_choice

log = get_logger(__name__)


def train(cfg, comm=None, inputs=None) -> dict:
    """Run the training that `cfg` (a Config) describes on `comm`; return the summary.

    inputs: a RunInputs (mpifed.train.run's model, arrays and callbacks), or None.

    Refuses a one-rank world that the launcher meant as several (launch_check.py) and a
    run.out that another run holds (run_lock.py: rank 0 locks it until this call returns).

    A disk-full error on a file whose earlier copy this run moved aside (a finished run's
    model.h5 to OUT/previous-<time>/, run.resume = "never"'s checkpoints to
    OUT/checkpoints.before-<time>/) names where that copy is.
    """
    comm = comm or MPI.COMM_WORLD
    check_launch(MPI.COMM_WORLD.size)  # before anything is written
    xp = array_backend(cfg.comm, comm)
    check_levers(cfg.model, cfg.run, xp)  # the same verdict on every rank: xp is alike
    threads = raise_together(comm, lambda: thread_choice(comm))  # a bad variable: all stop
    log.debug("array backend %s, %d BLAS thread(s) on this rank (%s)", xp.__name__,
              threads.threads, threads.reason)
    with threadpool_limits(limits=threads.threads if threads.limit else None), \
            naming_moved_files(time.time()), RunLock() as lock:
        if cfg.federated is not None:
            from .federated import run_federation

            return run_federation(cfg, comm, xp, inputs or NO_INPUTS, lock)
        from .data_parallel import run_data_parallel

        return run_data_parallel(cfg, comm, xp, inputs or NO_INPUTS, lock)
