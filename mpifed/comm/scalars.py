"""Small numbers reduced or gathered over a communicator in int64 buffers, never pickled.

mpi4py's lower-case methods pickle their Python objects, and a communicator that spans
institutions must never unpickle another institution's bytes; these take and return plain
ints, through the upper-case (buffer) methods.

    >>> allreduce_int(comm, len(shard), MPI.MIN)     # the smallest shard of every rank
    >>> allgather_ints(comm, node.size)              # [size on rank 0, on rank 1, ...]
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI


def allreduce_int(comm, value: int, op=MPI.SUM) -> int:
    """Return `value` reduced with `op` (MPI.SUM, MIN, MAX) over every rank of `comm`."""
    buf = np.array([value], dtype=np.int64)
    comm.Allreduce(MPI.IN_PLACE, buf, op=op)
    return int(buf[0])


def allgather_ints(comm, values) -> list:
    """Return every rank's int (or equal-length tuple of ints), in rank order."""
    row = np.atleast_1d(np.asarray(values, dtype=np.int64))
    every = np.empty((comm.size, row.size), dtype=np.int64)
    comm.Allgather(row, every)
    if np.ndim(values) == 0:
        return [int(v) for v in every[:, 0]]
    return [tuple(int(v) for v in r) for r in every]


def bcast_ints(comm, values, root: int = 0) -> list[int]:
    """Return the root's list of ints (its length included) on every rank of `comm`."""
    size = np.array([len(values) if comm.rank == root else 0], dtype=np.int64)
    comm.Bcast(size, root=root)
    buf = np.zeros(int(size[0]), dtype=np.int64)
    if comm.rank == root:
        buf[:] = values
    comm.Bcast(buf, root=root)
    return [int(v) for v in buf]
