"""NCCL all-reduce for CuPy buffers (cupy.cuda.nccl): the GPU-to-GPU path inside a node.

The NCCL communicator is built once per MPI communicator (rank 0's unique id broadcast over MPI)
and cached on it. Buffers never leave the device, and NCCL runs on CuPy's current stream, so
what comes after it on that stream sees the result.
"""

from __future__ import annotations

from mpi4py import MPI

from ..xp import cupy_module, get_array_module
from .checks import check_local, check_same_signature

_NCCL = MPI.Comm.Create_keyval()


def nccl_communicator(comm):
    """Return the cached NCCL communicator of `comm` (collective the first time)."""
    cached = comm.Get_attr(_NCCL)
    if cached is None:
        from cupy.cuda import nccl

        uid = nccl.get_unique_id() if comm.rank == 0 else None
        uid = comm.bcast(uid, root=0)
        cached = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        comm.Set_attr(_NCCL, cached)
    return cached


def nccl_dtype(dtype):
    """Return NCCL's code for a NumPy dtype."""
    from cupy.cuda import nccl

    codes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
             "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
    return codes[dtype.name]


def nccl_allreduce(buf, comm, op: str = "sum", *, check: bool = True):
    """Sum (or average) a contiguous 1-D CuPy array over `comm` with NCCL, in place; return it."""
    check_local(buf, op)
    if cupy_module() is None or get_array_module(buf).__name__ != "cupy":
        raise ValueError("algorithm 'nccl' needs CuPy arrays on a GPU; use 'ring', 'mpi' or "
                         "'hierarchical' for host arrays")
    if check:
        check_same_signature(comm, buf.size, buf.dtype)
    if comm.size > 1 and buf.size > 0:
        from cupy.cuda import nccl

        stream = cupy_module().cuda.get_current_stream()
        nccl_communicator(comm).allReduce(buf.data.ptr, buf.data.ptr, buf.size,
                                          nccl_dtype(buf.dtype), nccl.NCCL_SUM, stream.ptr)
    if op == "mean" and comm.size > 1:
        buf /= buf.dtype.type(comm.size)
    return buf
