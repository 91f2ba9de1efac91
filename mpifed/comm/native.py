"""The MPI library's own `MPI_Allreduce`, behind the same signature as the ring."""

from __future__ import annotations

from mpi4py import MPI

from ..xp import get_array_module
from .backend import mpi_view
from .checks import check_local, check_same_signature


def mpi_allreduce(buf, comm, op: str = "sum", *, check: bool = True):
    """Sum (or average) a contiguous 1-D array over `comm` in place with MPI_Allreduce; return it."""
    check_local(buf, op)
    if check:
        check_same_signature(comm, buf.size, buf.dtype)
    if comm.size > 1 and buf.size > 0:
        work, copy_back = mpi_view(buf, comm)
        comm.Allreduce(MPI.IN_PLACE, work, op=MPI.SUM)
        copy_back()
    if op == "mean" and comm.size > 1:
        xp = get_array_module(buf)
        xp.divide(buf, buf.dtype.type(comm.size), out=buf)
    return buf
