"""`allreduce`: one entry point that picks the ring or the MPI library's own algorithm."""

from __future__ import annotations

import os

from .native import mpi_allreduce
from .ring import ring_allreduce

ALGORITHMS = ("auto", "ring", "mpi")

# Below this many bytes MPI_Allreduce wins (latency-bound: one C call beats 2(n-1) Python
# messages); from it up, the pipelined ring wins. Measured with `mpifed bench allreduce` on
# 2 and 4 ranks of a 2-core machine with MPICH 5.0.2 (see README, "All-reduce benchmark").
RING_MIN_BYTES = int(os.environ.get("MPIFED_RING_MIN_BYTES", 512 * 1024))


def choose_algorithm(nbytes: int, ranks: int) -> str:
    """Return the algorithm that "auto" uses for a message of `nbytes` on `ranks` ranks."""
    if ranks > 1 and nbytes >= RING_MIN_BYTES:
        return "ring"
    return "mpi"


def allreduce(buf, comm, op: str = "sum", algorithm: str = "auto", *, check: bool = True):
    """Sum (or average) a contiguous 1-D NumPy/CuPy array over `comm` in place; return `buf`.

    algorithm: "ring" (our pipelined ring), "mpi" (MPI_Allreduce) or "auto" (by message size).
    check: agree on length and dtype first (one tiny all-reduce); pass False on a hot path whose
    buffer was checked once already.
    """
    if algorithm == "auto":
        algorithm = choose_algorithm(buf.nbytes, comm.size)
    if algorithm == "ring":
        return ring_allreduce(buf, comm, op, check=check)
    if algorithm == "mpi":
        return mpi_allreduce(buf, comm, op, check=check)
    raise ValueError(f"algorithm={algorithm!r} is not known; use one of {ALGORITHMS}")
