"""NCCL all-reduce for CuPy buffers (cupy.cuda.nccl): the GPU-to-GPU path inside a node.

The NCCL communicator is built once per MPI communicator (rank 0's unique id broadcast over MPI)
and cached on it. Buffers never leave the device, and NCCL runs on CuPy's current stream, so
what comes after it on that stream sees the result.

NCCL needs libnccl (CuPy's wheels do not ship it) and one GPU per rank: `nccl_unavailable`
tells why it cannot run, with the same answer on every rank, before anything is tried.
"""

from __future__ import annotations

from mpi4py import MPI

from ..xp import cupy_module, device_identity, get_array_module
from .agree import gather_texts
from .checks import check_local, check_same_signature
from .scalars import allgather_ints, bcast_ints
from .topology import topology

_NCCL = MPI.Comm.Create_keyval()
_UNAVAILABLE = MPI.Comm.Create_keyval()  # the agreed reason (or "") cached on the communicator

_NO_GPU, _NO_LIBRARY, _SHARED_GPU = 1, 2, 4


def nccl_library():
    """Return `cupy.cuda.nccl` when libnccl was found, else None (CuPy missing too)."""
    if cupy_module() is None:
        return None
    try:
        from cupy.cuda import nccl
    except ImportError:
        return None
    return nccl if getattr(nccl, "available", True) else None


def install_hint() -> str:
    """Return how to install NCCL for the CuPy at hand (its CUDA major version)."""
    major = "12"
    try:
        major = str(cupy_module().cuda.runtime.runtimeGetVersion() // 1000)
    except Exception:  # no CuPy or no runtime: the common case's name
        pass
    return (f"pip install nvidia-nccl-cu{major}, or load the site's NCCL module (module load "
            "nccl) so that libnccl.so.2 is found")


def _local_problems(comm) -> tuple[int, int, int]:
    """Return (flags, ranks on this node, GPUs they use) for this rank (collective).

    GPUs are told apart by PCI bus id, so ranks that each see one GPU of their own (SLURM's
    --gpus-per-task=1) are not taken for ranks sharing device 0.
    """
    node = topology(comm)[0]
    devices = gather_texts(node, device_identity())  # the node may span institutions
    if cupy_module() is None:
        return _NO_GPU, node.size, 0
    gpus = len(set(devices))
    flags = 0 if nccl_library() is not None else _NO_LIBRARY
    if gpus < node.size:
        flags |= _SHARED_GPU
    return flags, node.size, gpus


def nccl_unavailable(comm) -> str | None:
    """Return why NCCL cannot reduce over `comm`, or None; the same answer on every rank.

    Collective over `comm` the first time (the answer is cached on it).
    """
    cached = comm.Get_attr(_UNAVAILABLE)
    if cached is None:
        reports = allgather_ints(comm, _local_problems(comm))  # buffers, never pickles
        cached = _reason(reports)
        comm.Set_attr(_UNAVAILABLE, cached)
    return cached or None


def _reason(reports) -> str:
    """Return the first problem among the ranks' (flags, ranks here, GPUs here), or ""."""
    for rank, (flags, ranks_here, gpus) in enumerate(reports):
        if flags & _NO_GPU:
            return f"NCCL needs CuPy and a GPU, and rank {rank} has none"
        if flags & _NO_LIBRARY:
            return (f"NCCL is not installed (cupy.cuda.nccl.available is false on rank {rank}):"
                    f" {install_hint()}")
        if flags & _SHARED_GPU:
            return (f"{ranks_here} ranks share {gpus} GPU(s) on the node of rank {rank}, and "
                    "NCCL cannot run two ranks on one GPU; start at most one rank per GPU, or "
                    "use comm.allreduce = \"mpi\"")
    return ""


def nccl_communicator(comm):
    """Return the cached NCCL communicator of `comm` (collective the first time).

    Raises ValueError on every rank, saying why, when NCCL cannot run (`nccl_unavailable`).
    """
    cached = comm.Get_attr(_NCCL)
    if cached is None:
        reason = nccl_unavailable(comm)
        if reason:
            raise ValueError(f"algorithm 'nccl': {reason}")
        nccl = nccl_library()
        uid = nccl.get_unique_id() if comm.rank == 0 else ()
        uid = tuple(bcast_ints(comm, uid))  # NCCL's id: 128 signed chars, as ints
        cached = nccl.NcclCommunicator(comm.size, uid, comm.rank)
        comm.Set_attr(_NCCL, cached)
    return cached


def nccl_dtype(dtype):
    """Return NCCL's code for a NumPy dtype."""
    nccl = nccl_library()
    codes = {"float16": nccl.NCCL_FLOAT16, "float32": nccl.NCCL_FLOAT32,
             "float64": nccl.NCCL_FLOAT64, "int32": nccl.NCCL_INT32, "int64": nccl.NCCL_INT64}
    return codes[dtype.name]


def nccl_allreduce(buf, comm, op: str = "sum", *, check: bool = True):
    """Sum (or average) a contiguous 1-D CuPy array over `comm` with NCCL, in place; return it.

    Runs NCCL on one rank too (a copy in place), so that a single GPU exercises the library.
    """
    check_local(buf, op)
    if cupy_module() is None or get_array_module(buf).__name__ != "cupy":
        raise ValueError("algorithm 'nccl' needs CuPy arrays on a GPU; use 'ring', 'mpi' or "
                         "'hierarchical' for host arrays")
    if check:
        check_same_signature(comm, buf.size, buf.dtype)
    if buf.size > 0:
        nccl = nccl_library()
        communicator = nccl_communicator(comm)
        with buf.device:
            stream = cupy_module().cuda.get_current_stream()
            communicator.allReduce(buf.data.ptr, buf.data.ptr, buf.size, nccl_dtype(buf.dtype),
                                   nccl.NCCL_SUM, stream.ptr)
    if op == "mean" and comm.size > 1:
        buf /= buf.dtype.type(comm.size)
    return buf
