"""The MPI library's own `MPI_Allreduce`, `MPI_Reduce_scatter` and `MPI_Allgatherv`, behind the
same signatures as the ring.

16-bit floats: MPI_Allgatherv moves them as raw uint16 words; the reductions use the library's
half type where it has one (MPICH), else a user operation over the raw words (Open MPI; see
datatypes.py), which reads host memory: device buffers are then staged through the host.
"""

from __future__ import annotations

from mpi4py import MPI

from ..xp import get_array_module
from .backend import host_view, mpi_view
from .checks import check_buffer
from .datatypes import mpi_sums, reduction, wire
from .ring import chunk_bounds, mean_in_place


def mpi_allreduce(buf, comm, op: str = "sum", *, check: bool = True):
    """Sum (or average) a contiguous 1-D array over `comm` in place with MPI_Allreduce; return it."""
    check_buffer(buf, comm, op, check)
    if comm.size > 1 and buf.size > 0:
        work, copy_back = _reduction_view(buf, comm)
        words, mpi_op = reduction(work)
        comm.Allreduce(MPI.IN_PLACE, words, op=mpi_op)
        copy_back()
    return mean_in_place(buf, comm, op)


def mpi_reduce_scatter(buf, comm, op: str = "sum", *, check: bool = True, bounds=None):
    """Reduce `buf` over `comm` with MPI_Reduce_scatter; return this rank's chunk (a view).

    The chunk is chunk_bounds(buf.size, comm.size)[comm.rank]; the rest of `buf` is unchanged.
    """
    check_buffer(buf, comm, op, check)
    bounds = bounds or chunk_bounds(buf.size, comm.size)
    lo, hi = bounds[comm.rank]
    if comm.size > 1 and buf.size > 0:
        work, copy_back = _reduction_view(buf, comm)
        own = get_array_module(work).empty(hi - lo, dtype=work.dtype)
        words, mpi_op = reduction(work)
        comm.Reduce_scatter(words, own if words is work else wire(own),
                            [b - a for a, b in bounds], op=mpi_op)
        work[lo:hi] = own
        copy_back()
    chunk = buf[lo:hi]
    return mean_in_place(chunk, comm, op)


def mpi_allgather(buf, comm, *, check: bool = True, bounds=None):
    """Fill every chunk of `buf` from its owner with MPI_Allgatherv (in place); return `buf`."""
    check_buffer(buf, comm, "sum", check)
    if comm.size > 1 and buf.size > 0:
        bounds = bounds or chunk_bounds(buf.size, comm.size)
        work, copy_back = mpi_view(buf, comm)
        counts, displs = [b - a for a, b in bounds], [a for a, _ in bounds]
        comm.Allgatherv(MPI.IN_PLACE, [wire(work), (counts, displs)])
        copy_back()
    return buf


def _reduction_view(buf, comm):
    """mpi_view(buf, comm), or host_view where our user operation does the sum (host only)."""
    return mpi_view(buf, comm) if mpi_sums(buf.dtype) else host_view(buf, comm)
