"""The bridge from array buffers to MPI: CUDA-aware detection, host staging, device binding.

MPI reads a buffer through its pointer, so a CuPy buffer may be handed to MPI only when the
library is CUDA-aware, and only after the stream that wrote it has finished. Otherwise the bytes
are staged through a host (pinned) buffer, cached on the communicator that moves them.
"""

from __future__ import annotations

import ctypes
import functools
import os
import warnings

import numpy as np
from mpi4py import MPI

from ..errors import UserError
from ..log import get_logger
from ..xp import (
    backend_module,
    cupy_module,
    device_identity,
    get_array_module,
    is_device_array,
    record_event,
    synchronize,
    to_host,
)
from .agree import gather_texts
from .scalars import allreduce_int

log = get_logger(__name__)

__all__ = ["backend_module", "check_cuda_aware", "cuda_aware", "get_array_module", "host_view",
           "mpi_view", "select_device", "synchronize"]


def _loaded_mpi_library() -> str | None:
    """Return the path of the libmpi this process has loaded, read from /proc/self/maps."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.split()[-1]
                if "libmpi" in os.path.basename(path) and ".so" in path:
                    return path
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def cuda_aware() -> bool:
    """Tell whether the MPI library accepts device pointers.

    `MPIFED_CUDA_AWARE=0/1` decides when set: the override is for MPI libraries whose query
    answers wrongly, and `select_device` tries a forced yes once (`check_cuda_aware`).
    Otherwise ask `MPIX_Query_cuda_support` (Open MPI, recent MPICH) in the loaded library;
    without that function, assume not, which is always safe.
    """
    forced = os.environ.get("MPIFED_CUDA_AWARE")
    if forced is not None:
        return forced.strip().lower() in ("1", "true", "yes", "on")
    path = _loaded_mpi_library()
    try:
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        query = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


def host_view(buf, comm):
    """Return `(host_buffer, copy_back)` for `buf`: itself for host arrays, else a pinned copy.

    comm: the communicator that will move the bytes; the pinned buffer is cached on it.
    """
    if type(buf) is np.ndarray or not is_device_array(buf):
        return buf, _nothing
    synchronize(buf)
    return _staged(buf, comm)


def _staged(buf, comm):
    """Copy a device array into `comm`'s reused pinned buffer; return it and the copy back.

    The copy back runs asynchronously on the current stream; its event is kept with the
    buffer, and the buffer is not written again, nor replaced, before that copy has read it.
    """
    host = _pinned(comm, buf.nbytes)[:buf.nbytes].view(buf.dtype)
    buf.get(out=host)  # synchronous: MPI may read `host` when this returns

    def copy_back():
        buf.set(host)
        held, _ = comm.Get_attr(_PINNED)
        with buf.device:
            comm.Set_attr(_PINNED, (held, record_event(cupy_module())))

    return host, copy_back


def mpi_view(buf, comm):
    """Return `(host_or_device_buffer, copy_back)` that MPI may read and write for `buf`.

    For host arrays and CUDA-aware MPI this is `buf` itself (after a stream sync). Otherwise a
    pinned host copy (cached on `comm`) is returned, and `copy_back()` moves the result to the
    device.
    """
    if type(buf) is np.ndarray or not is_device_array(buf):
        return buf, _nothing
    synchronize(buf)
    if cuda_aware():
        return buf, _nothing
    return _staged(buf, comm)


def _nothing() -> None:
    return None


# The staging buffer is an attribute of the communicator, so it goes when the communicator does.
_PINNED = MPI.Comm.Create_keyval()


def _pinned(comm, nbytes: int) -> np.ndarray:
    """Return `comm`'s page-locked host buffer of at least `nbytes` (kept for the next step),
    once the last copy that read it has finished."""
    held, copied = comm.Get_attr(_PINNED) or (None, None)
    if copied is not None:
        copied.synchronize()
    if held is None or held.nbytes < nbytes:
        memory = cupy_module().cuda.alloc_pinned_memory(nbytes)
        held = np.frombuffer(memory, dtype=np.uint8, count=nbytes)
    comm.Set_attr(_PINNED, (held, None))
    return held


def select_device(comm) -> int | None:
    """Bind this rank to a GPU chosen by its node-local rank; return the device id or None.

    World rank would put rank 8 of a 4-GPU node on a device that does not exist; the rank within
    `COMM_TYPE_SHARED` is what counts. More ranks on a node than GPUs share them round-robin,
    with a warning (NCCL then refuses to run). With `MPIFED_CUDA_AWARE` set, the override is
    tried once here (`check_cuda_aware`). Collective over `comm`.
    """
    cp = cupy_module()
    if cp is None:
        return None
    from .topology import topology

    node = topology(comm)[0]
    device = node.rank % cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(device).use()
    # Physical devices, not ordinals: under --gpus-per-task=1 each rank sees its own GPU as 0.
    gpus = len(set(gather_texts(node, device_identity())))  # the node may span institutions
    if gpus < node.size and node.rank == 0:
        warnings.warn(f"{node.size} ranks share {gpus} GPU(s) on this node; start one rank per "
                      "GPU. comm.allreduce = \"nccl\" is refused so: NCCL cannot run two ranks "
                      "on one GPU", RuntimeWarning, stacklevel=2)
    check_cuda_aware(comm)
    return device


def check_cuda_aware(comm) -> None:
    """Try `MPIFED_CUDA_AWARE=1` with a one-element device all-reduce; raise UserError if wrong.

    The override is for MPI libraries whose own query answers wrongly. On an MPI that is not
    CUDA-aware the device pointer is read as host memory: the sum comes out wrong (caught here,
    on every rank together) or the process crashes in MPI, which the notice printed first
    explains. Does nothing unless the variable forces CUDA-awareness. Collective over `comm`.
    """
    cp = cupy_module()
    if cp is None or os.environ.get("MPIFED_CUDA_AWARE") is None or not cuda_aware():
        return
    if comm.rank == 0:
        log.info("MPIFED_CUDA_AWARE=1: checking with a one-element device all-reduce (a crash "
                 "here means this MPI is not CUDA-aware: unset MPIFED_CUDA_AWARE)")
    probe = cp.full(1, comm.rank + 1, dtype=cp.float64)
    synchronize(probe)
    comm.Allreduce(MPI.IN_PLACE, probe, op=MPI.SUM)
    got, want = float(to_host(probe)[0]), comm.size * (comm.size + 1) / 2
    if not allreduce_int(comm, int(got == want), MPI.MIN):  # buffers, never pickles
        raise UserError(f"MPIFED_CUDA_AWARE=1, but a one-element device all-reduce gave {got} "
                        f"where {want} was due on rank {comm.rank} or another: this MPI is not "
                        "CUDA-aware; unset MPIFED_CUDA_AWARE (device buffers are then staged "
                        "through host memory)")
