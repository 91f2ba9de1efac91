"""The array backend: one `xp` path for NumPy and CuPy, with no MPI in sight.

Models, optimisers and strategies look their array module up here, so importing them never
starts MPI. The bridge from device buffers to MPI lives in `mpifed.comm.backend`.
"""

from __future__ import annotations

import functools
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

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
    """Wait until the GPU stream has finished writing `array`; a no-op for host arrays.

    The stream waited on is this thread's current stream on the array's own device (each
    device has its own current stream), whichever device the thread is on.
    """
    if is_device_array(array):
        cp = cupy_module()
        with array.device:
            cp.cuda.get_current_stream().synchronize()


def device_identity() -> str | None:
    """Return the PCI bus id of this thread's current GPU (one physical device, whatever
    CUDA_VISIBLE_DEVICES numbers it), or None without CuPy."""
    cp = cupy_module()
    return None if cp is None else cp.cuda.Device().pci_bus_id


def to_host(array) -> np.ndarray:
    """Return a NumPy copy (device arrays) or the array itself (host arrays)."""
    return array.get() if hasattr(array, "get") else array


# The stream a pool thread made current; CuPy's current stream must outlive its use.
_THREAD = threading.local()


def bind_thread(xp, device_id: int) -> None:
    """Put the calling thread on GPU `device_id`, with a non-blocking stream of its own.

    A new host thread starts on device 0 (`cudaSetDevice` is per thread), so every worker
    thread that touches device arrays binds first. Its own stream lets its work overlap the
    compute stream; ordering against that stream goes through events (`record_event`).
    """
    xp.cuda.Device(device_id).use()
    _THREAD.stream = xp.cuda.Stream(non_blocking=True)
    _THREAD.stream.use()


# Signals with Python handlers (Ctrl-C, and the preemption signals of mpifed/train/signals.py).
# CPython runs a handler in the main thread, but when the kernel hands the signal to another
# thread, CPython 3.11 does not wake the main thread's check for it: the handler may run many
# steps late (a stop asked at step 101 happened at 102). Background threads block them, so the
# kernel always delivers them to the main thread.
MAIN_THREAD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)


def leave_signals_to_main_thread() -> None:
    """Block MAIN_THREAD_SIGNALS in the calling thread; every background thread calls it
    first (a thread's signal mask is its own; threads it starts inherit it)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_THREAD_SIGNALS)


def background_thread(target, name: str, args=()) -> threading.Thread:
    """Return a daemon thread (not started) that runs `target(*args)` with the signals left
    to the main thread."""
    def run(*a):
        leave_signals_to_main_thread()
        target(*a)
    return threading.Thread(target=run, args=args, name=name, daemon=True)


def _device_worker(xp, device_id: int) -> None:
    leave_signals_to_main_thread()
    bind_thread(xp, device_id)


def device_thread_pool(xp, name: str) -> ThreadPoolExecutor:
    """Return a one-thread pool whose thread works on the caller's current GPU (host: plain);
    its thread leaves the signals to the main thread."""
    if xp is np:
        return ThreadPoolExecutor(1, thread_name_prefix=name,
                                  initializer=leave_signals_to_main_thread)
    return ThreadPoolExecutor(1, thread_name_prefix=name, initializer=_device_worker,
                              initargs=(xp, xp.cuda.Device().id))


def record_event(xp, timing: bool = False):
    """Return an event recorded on this thread's current stream; None on the host."""
    if xp is np:
        return None
    event = xp.cuda.Event(disable_timing=not timing)
    event.record(xp.cuda.get_current_stream())
    return event


def wait_event(event) -> None:
    """Make this thread's current stream wait for `event` (no host block); None and host
    time marks pass."""
    if event is None or isinstance(event, float):
        return
    cupy_module().cuda.get_current_stream().wait_event(event)


def mark(xp):
    """Return a time mark: a timed CUDA event on the current stream, or perf_counter() seconds.

    Device work is asynchronous: the host clock says when a call returned, an event when the
    stream got there, so GPU spans are measured between events (`seconds_between`).
    """
    return time.perf_counter() if xp is np else record_event(xp, timing=True)


def seconds_between(start, end) -> float:
    """Return the seconds from mark `start` to mark `end` (waits for a device `end` event)."""
    if isinstance(start, float):
        return end - start
    end.synchronize()
    return cupy_module().cuda.get_elapsed_time(start, end) / 1000.0  # ms -> s


class DeviceCopier:
    """Move host arrays to the device on a dedicated stream; called from a loader thread.

    Each array goes host -> pinned staging buffer -> device by an asynchronous copy on a
    non-blocking stream of its own, so it overlaps the compute stream, and an event is
    recorded after it. `wait()`, called by the consumer before it uses the arrays, makes the
    consumer's current stream wait on those events: compute never reads a batch before it has
    arrived, whichever stream it runs on (per-thread default streams too). A staging buffer is
    written again, or replaced by a larger one, only after the copy that read it has finished.

    The device arrays are allocated while the copy stream is current, so CuPy's pool hands
    their memory back to that stream's arena and never gives a compute temporary still in use
    to a copy. The consumer must be done with a batch (its stream synchronised, as each
    training step's loss read-back does) before it drops it.
    """

    SLOTS = 4  # staging buffers in a ring: two batches of (x, y) in flight

    def __init__(self, xp):
        self.xp, self.device = xp, xp.cuda.Device()  # the device chosen now, by node rank
        self._stream = None  # made on first use, on the device
        self._slots: list = [None] * self.SLOTS  # (pinned uint8 buffer, event of its copy)
        self._turn = 0
        self._pending: list = []  # events the consumer has not waited on yet
        self._lock = threading.Lock()

    def __call__(self, array):
        """Start copying `array` (host) to the device; return the device array."""
        array = np.ascontiguousarray(array)
        with self.device:
            if self._stream is None:
                self._stream = self.xp.cuda.Stream(non_blocking=True)
            slot, buffer = self._staging(array.nbytes)
            staging = buffer[:array.nbytes].view(array.dtype).reshape(array.shape)
            staging[...] = array
            with self._stream:
                out = self.xp.empty(array.shape, dtype=array.dtype)
                out.set(staging, stream=self._stream)
                event = self._stream.record()
        self._slots[slot] = (buffer, event)
        with self._lock:
            self._pending.append(event)
        return out

    def _staging(self, nbytes: int):
        """Return (slot, pinned buffer of at least `nbytes`) once its last copy has finished."""
        slot, self._turn = self._turn, (self._turn + 1) % self.SLOTS
        held = self._slots[slot]
        if held is not None:
            buffer, event = held
            event.synchronize()  # the copy that read this buffer is done: safe to overwrite
            if buffer.nbytes >= nbytes:
                return slot, buffer
        memory = self.xp.cuda.alloc_pinned_memory(max(nbytes, 1))
        return slot, np.frombuffer(memory, dtype=np.uint8, count=max(nbytes, 1))

    def wait(self) -> None:
        """Make the calling thread's current stream wait for every copy started so far."""
        with self._lock:
            events, self._pending = self._pending, []
        with self.device:
            stream = self.xp.cuda.get_current_stream()
            for event in events:
                stream.wait_event(event)


def device_copier(xp):
    """Return a function that moves host arrays to `xp`'s device, usable from other threads.

    NumPy: `np.asarray`. CuPy: a `DeviceCopier` pinned to the device current now (chosen by
    node-local rank), whose `wait()` the consumer calls before using what it returned.
    """
    if xp is np:
        return np.asarray
    return DeviceCopier(xp)
