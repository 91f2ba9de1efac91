"""The array backend: one `xp` path for NumPy and CuPy, with no MPI in sight.

Models, optimisers and strategies look their array module up here, so importing them never
starts MPI. The bridge from device buffers to MPI lives in `mpifed.comm.backend`.
"""

from __future__ import annotations

import functools

import numpy as np

BACKENDS = ("auto", "numpy", "cupy")


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
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; use one of {', '.join(BACKENDS)}")
    return cp if cp is not None else np


def is_device_array(array) -> bool:
    """Tell whether `array` lives in GPU memory."""
    return get_array_module(array) is not np


def synchronize(array) -> None:
    """Wait until the GPU stream has finished writing `array`; a no-op for host arrays."""
    if is_device_array(array):
        cupy_module().cuda.get_current_stream().synchronize()


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
