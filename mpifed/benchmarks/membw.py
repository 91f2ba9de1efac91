"""The node's memory bandwidth, measured with all of its ranks copying at once."""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI


def node_copy_bandwidth(node, nbytes: int = 64 << 20, repeats: int = 5) -> float:
    """Return the node's memory bandwidth in bytes/s: all ranks of `node` copy `nbytes` at once.

    A copy reads and writes each byte, so it moves 2 * nbytes; the node's figure is the sum over
    its ranks of the best of `repeats` (collective over `node`).
    """
    src = np.ones(nbytes // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        node.Barrier()
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return node.allreduce(2 * src.nbytes / best, op=MPI.SUM)


def allreduce_bound_seconds(nbytes: int, ranks: int, node_bandwidth: float) -> float:
    """Return the least time an all-reduce of `nbytes` per rank over `ranks` ranks on one node takes.

    Whatever the algorithm, every rank's input must be read once and every rank's output written
    once: 2 * ranks * nbytes bytes through the node's memory.
    """
    return 2 * ranks * nbytes / node_bandwidth
