"""BLAS threads per rank under mpiexec: ranks on a node share its cores."""

from __future__ import annotations

import os

import pytest
from mpi4py import MPI

from mpifed.train.setup import blas_threads_per_rank


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.mark.mpi(min_size=1)
def test_ranks_on_a_node_share_its_cores(monkeypatch):
    monkeypatch.delenv("MPIFED_BLAS_THREADS", raising=False)
    monkeypatch.delenv("MPIFED_RANKS_PER_NODE", raising=False)
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                 "SLURM_CPUS_PER_TASK"):  # the user's choices (tests/unit/test_thread_choice.py)
        monkeypatch.delenv(name, raising=False)
    world = MPI.COMM_WORLD
    node = world.Split_type(MPI.COMM_TYPE_SHARED)  # MPI's own node split, the reference
    try:
        assert blas_threads_per_rank(world) == max(1, cores() // node.size)
    finally:
        node.Free()
