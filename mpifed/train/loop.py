"""`train(cfg, comm)`: the one entry point; it chooses the data-parallel or the federated loop.

    mpiexec -n 4 mpifed train run.toml                  # data-parallel
    mpiexec -n 4 mpifed train fed.toml                  # with a [federated] section

Both loops build on `setup.py`; neither imports the other.
"""

from __future__ import annotations

from mpi4py import MPI
from threadpoolctl import threadpool_limits

from .setup import array_backend, blas_threads_per_rank


def train(cfg, comm=None) -> dict:
    """Run the training that `cfg` (a Config) describes on `comm`; return the summary."""
    comm = comm or MPI.COMM_WORLD
    xp = array_backend(cfg.comm, comm)
    with threadpool_limits(limits=blas_threads_per_rank(comm)):
        if cfg.federated is not None:
            from .federated import run_federation

            return run_federation(cfg, comm, xp)
        from .data_parallel import run_data_parallel

        return run_data_parallel(cfg, comm, xp)
