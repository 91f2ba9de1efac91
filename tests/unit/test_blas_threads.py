"""BLAS threads for one process: every core, or MPIFED_BLAS_THREADS."""

from __future__ import annotations

import os

from mpi4py import MPI

from mpifed.train.setup import blas_threads_per_rank


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def test_one_process_takes_every_core_and_the_variable_sets_it(monkeypatch):
    monkeypatch.delenv("MPIFED_BLAS_THREADS", raising=False)
    monkeypatch.delenv("MPIFED_RANKS_PER_NODE", raising=False)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "SLURM_CPUS_PER_TASK"):  # the user's choices (tests/unit/test_thread_choice.py)
        monkeypatch.delenv(name, raising=False)
    assert blas_threads_per_rank(MPI.COMM_SELF) == cores()
    monkeypatch.setenv("MPIFED_BLAS_THREADS", "3")
    assert blas_threads_per_rank(MPI.COMM_SELF) == 3
