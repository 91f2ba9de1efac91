"""The array backend: one `xp` path for NumPy and CuPy, and the bridge from device buffers to MPI.

MPI reads a buffer through its pointer, so a CuPy buffer may be handed to MPI only when the
library is CUDA-aware, and only after the stream that wrote it has finished. Otherwise the bytes
are staged through a host (pinned) buffer.
"""

from __future__ import annotations

import ctypes
import functools
import os

import numpy as np


@functools.lru_cache(maxsize=1)
def cupy_module():
    """Return the cupy module, or None when CuPy is not installed or has no usable device."""
    try:
        import cupy
    except Exception:  # ImportError, or a CUDA driver error raised at import
        return None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    return cupy


def get_array_module(array):
    """Return numpy or cupy, whichever owns `array`."""
    cp = cupy_module()
    if cp is not None:
        return cp.get_array_module(array)
    return np


def backend_module(name: str):
    """Return the array module for a backend name: 'numpy', 'cupy' or 'auto'."""
    if name == "numpy":
        return np
    cp = cupy_module()
    if name == "cupy" and cp is None:
        raise ValueError("backend 'cupy' asked for, but CuPy or a CUDA device is missing; "
                         "install mpifed[gpu] or set comm.backend = \"numpy\"")
    if name not in ("cupy", "auto"):
        raise ValueError(f"unknown backend {name!r}; use 'numpy', 'cupy' or 'auto'")
    return cp if cp is not None else np


def is_device_array(array) -> bool:
    """Tell whether `array` lives in GPU memory."""
    return get_array_module(array) is not np


def synchronize(array) -> None:
    """Wait until the GPU stream has finished writing `array`; a no-op for host arrays."""
    if is_device_array(array):
        cupy_module().cuda.get_current_stream().synchronize()


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
    from mpi4py import MPI  # noqa: F401  (MPI must be initialised before the query)

    path = _loaded_mpi_library()
    try:
        lib = ctypes.CDLL(path) if path else ctypes.CDLL(None)
        query = lib.MPIX_Query_cuda_support
    except (OSError, AttributeError):
        return False
    query.restype = ctypes.c_int
    return bool(query())


def host_view(buf):
    """Return `(host_buffer, copy_back)` for `buf`: itself for host arrays, else a pinned copy."""
    if type(buf) is np.ndarray or not is_device_array(buf):
        return buf, _nothing
    synchronize(buf)
    return _staged(buf)


def _staged(buf):
    """Copy a device array into the reused pinned buffer; return it and the copy back."""
    host = _pinned(buf.nbytes)[:buf.nbytes].view(buf.dtype)
    buf.get(out=host)

    def copy_back():
        buf.set(host)

    return host, copy_back


def mpi_view(buf):
    """Return `(host_or_device_buffer, copy_back)` that MPI may read and write for `buf`.

    For host arrays and CUDA-aware MPI this is `buf` itself (after a stream sync). Otherwise a
    pinned host copy is returned, and `copy_back()` moves the result to the device.
    """
    if type(buf) is np.ndarray or not is_device_array(buf):
        return buf, _nothing
    synchronize(buf)
    if cuda_aware():
        return buf, _nothing
    return _staged(buf)


def _nothing() -> None:
    return None


_pinned_cache: list = [None]


def _pinned(nbytes: int) -> np.ndarray:
    """Return a page-locked host buffer of at least `nbytes` (kept for the next step)."""
    held = _pinned_cache[0]
    if held is None or held.nbytes < nbytes:
        memory = cupy_module().cuda.alloc_pinned_memory(nbytes)
        held = _pinned_cache[0] = np.frombuffer(memory, dtype=np.uint8, count=nbytes)
    return held


def to_host(array) -> np.ndarray:
    """Return a NumPy copy (device arrays) or the array itself (host arrays)."""
    return array.get() if hasattr(array, "get") else array


def device_copier(xp):
    """Return a function that moves host arrays to `xp`'s device, usable from other threads.

    A CuPy allocation goes to the calling thread's current device, so the copier pins the
    device chosen now (by node-local rank) for the data loader's thread.
    """
    if xp is np:
        return np.asarray
    device = xp.cuda.Device()

    def copy(array):
        with device:
            return xp.asarray(array)
    return copy


def select_device(comm) -> int | None:
    """Bind this rank to a GPU chosen by its node-local rank; return the device id or None.

    World rank would put rank 8 of a 4-GPU node on a device that does not exist; the rank within
    `COMM_TYPE_SHARED` is what counts.
    """
    cp = cupy_module()
    if cp is None:
        return None
    from .topology import node_comm

    local = node_comm(comm)
    device = local.rank % cp.cuda.runtime.getDeviceCount()
    local.Free()
    cp.cuda.Device(device).use()
    return device
