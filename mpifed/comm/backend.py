"""The bridge from array buffers to MPI: CUDA-aware detection, host staging, device binding.

MPI reads a buffer through its pointer, so a CuPy buffer may be handed to MPI only when the
library is CUDA-aware, and only after the stream that wrote it has finished. Otherwise the bytes
are staged through a host (pinned) buffer, cached on the communicator that moves them.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np
from mpi4py import MPI

from ..xp import backend_module, cupy_module, get_array_module, is_device_array, synchronize

__all__ = ["backend_module", "cuda_aware", "get_array_module", "host_view", "mpi_view",
           "select_device", "synchronize"]

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

    `MPIFED_CUDA_AWARE=0/1` decides when set. Otherwise ask `MPIX_Query_cuda_support` (Open MPI,
    recent MPICH) in the loaded library; without that function, assume not, which is always safe.
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
    """Copy a device array into `comm`'s reused pinned buffer; return it and the copy back."""
    host = _pinned(comm, buf.nbytes)[:buf.nbytes].view(buf.dtype)
    buf.get(out=host)

    def copy_back():
        buf.set(host)

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
    """Return `comm`'s page-locked host buffer of at least `nbytes` (kept for the next step)."""
    held = comm.Get_attr(_PINNED)
    if held is None or held.nbytes < nbytes:
        memory = cupy_module().cuda.alloc_pinned_memory(nbytes)
        held = np.frombuffer(memory, dtype=np.uint8, count=nbytes)
        comm.Set_attr(_PINNED, held)
    return held


def select_device(comm) -> int | None:
    """Bind this rank to a GPU chosen by its node-local rank; return the device id or None.

    World rank would put rank 8 of a 4-GPU node on a device that does not exist; the rank within
    `COMM_TYPE_SHARED` is what counts.
    """
    cp = cupy_module()
    if cp is None:
        return None
    from .topology import node_rank

    device = node_rank(comm) % cp.cuda.runtime.getDeviceCount()
    cp.cuda.Device(device).use()
    return device
