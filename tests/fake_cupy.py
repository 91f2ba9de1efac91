"""A fake of the part of CuPy that mpifed calls, recording each call, for GPU logic without a GPU.

Arrays are NumPy arrays (a subclass that remembers its device), so the math runs; what is
recorded is what CUDA semantics make matter: which device and stream each thread is on (a new
thread starts on device 0 with its own default stream, as with per-thread default streams),
which stream waits on which event, and every device-to-host transfer.

    fake = FakeCupy(devices=2)
    fake.calls  # [("set_device", "MainThread", 1), ("d2h", "MainThread", 1, 16), ...]
"""

from __future__ import annotations

import itertools
import threading

import numpy as np

_clock = itertools.count(1)


class FakeArray(np.ndarray):
    """A NumPy array that lives on a fake device: transfers out of it are logged."""

    fake = None
    device_id = 0

    def __array_finalize__(self, obj):
        self.fake = getattr(obj, "fake", None)
        self.device_id = getattr(obj, "device_id", 0)

    @property
    def device(self):
        return self.fake.cuda.Device(self.device_id)

    def get(self, stream=None, out=None):
        self.fake.record("d2h", self.nbytes)
        host = np.asarray(self).copy() if out is None else out
        if out is not None:
            out[...] = np.asarray(self)
        return host

    def set(self, arr, stream=None):
        self.fake.record("h2d", arr.nbytes, stream.name if stream else None)
        np.asarray(self)[...] = arr

    def __setitem__(self, key, value):  # device to device, as in CuPy: no transfer
        if isinstance(value, FakeArray):
            value = value.view(np.ndarray)
        super().__setitem__(key, value)

    def __float__(self):
        self.fake.record("d2h", self.nbytes)
        return float(np.asarray(self))

    def __bool__(self):
        self.fake.record("d2h", self.nbytes)
        return bool(np.asarray(self))


class Event:
    def __init__(self, fake, disable_timing=False):
        self.fake, self.stream, self.time = fake, None, None
        self.timing = not disable_timing
        self.name = f"event{next(_clock)}"

    def record(self, stream=None):
        self.stream = stream or self.fake.cuda.get_current_stream()
        self.time = next(_clock)
        self.fake.record("record", self.name, self.stream.name)

    def synchronize(self):
        self.fake.record("event_sync", self.name)


class Stream:
    def __init__(self, fake, non_blocking=False, name=None):
        self.fake, self.non_blocking = fake, non_blocking
        self.device_id = fake.cuda.Device().id
        self.name = name or f"stream{next(_clock)}"
        self.ptr = next(_clock)
        self._previous = []

    def use(self):
        self.fake._thread().streams[self.device_id] = self
        return self

    def __enter__(self):
        state = self.fake._thread()
        self._previous.append(state.streams.get(self.device_id))
        state.streams[self.device_id] = self
        return self

    def __exit__(self, *exc):
        self.fake._thread().streams[self.device_id] = self._previous.pop()

    def record(self, event=None):
        event = event or Event(self.fake)
        event.record(self)
        return event

    def wait_event(self, event):
        self.fake.record("wait_event", self.name, event.name)

    def synchronize(self):
        self.fake.record("stream_sync", self.name)


class Device:
    def __init__(self, fake, device=None):
        self.fake = fake
        self.id = fake._thread().device if device is None else device
        self._previous = []

    def use(self):
        self.fake._thread().device = self.id
        self.fake.record("set_device", self.id)

    def __enter__(self):
        state = self.fake._thread()
        self._previous.append(state.device)
        state.device = self.id
        return self

    def __exit__(self, *exc):
        self.fake._thread().device = self._previous.pop()

    @property
    def pci_bus_id(self):
        return self.fake.pci_ids[self.id]


class _Namespace:
    pass


class FakeCupy:
    """Stands in for the `cupy` module (`__name__ == "cupy"`)."""

    __name__ = "cupy"

    def __init__(self, devices: int = 2, pci_ids=None, cuda_version: int = 12080):
        self.devices, self.calls = devices, []
        self.pci_ids = pci_ids or [f"0000:{i + 1:02x}:00.0" for i in range(devices)]
        self._local = threading.local()
        self.__version__ = "0-fake"
        cuda = self.cuda = _Namespace()
        cuda.Device = lambda device=None: Device(self, device)
        cuda.Stream = lambda non_blocking=False: Stream(self, non_blocking)
        cuda.Event = lambda disable_timing=False, **kw: Event(self, disable_timing)
        cuda.get_current_stream = self._current_stream
        cuda.get_elapsed_time = lambda start, end: float(end.time - start.time)
        cuda.alloc_pinned_memory = self._alloc_pinned
        cuda.runtime = _Namespace()
        cuda.runtime.getDeviceCount = lambda: self.devices
        cuda.runtime.runtimeGetVersion = lambda: cuda_version

    def _thread(self):
        state = self._local
        if not hasattr(state, "device"):
            state.device, state.streams = 0, {}  # a new host thread starts on device 0
        return state

    def _current_stream(self):
        state = self._thread()
        device = state.device
        if device not in state.streams:  # this thread's own default stream on that device
            state.streams[device] = Stream(self, name=f"default-{threading.current_thread().name}"
                                                      f"-dev{device}")
        return state.streams[device]

    def _alloc_pinned(self, nbytes):
        self.record("alloc_pinned", nbytes)
        return bytearray(nbytes)

    def record(self, what, *details):
        """Log (what, thread name, current device, *details)."""
        self.calls.append((what, threading.current_thread().name, self._thread().device, *details))

    def of(self, what):
        """Return the log entries of kind `what`."""
        return [entry for entry in self.calls if entry[0] == what]

    # -- arrays: NumPy underneath, placed on the current device --------------------------------
    def _wrap(self, host):
        out = np.asarray(host).view(FakeArray)
        out.fake, out.device_id = self, self._thread().device
        return out

    def get_array_module(self, *arrays):
        return self if any(isinstance(a, FakeArray) for a in arrays) else np

    def asarray(self, a, dtype=None):
        if isinstance(a, FakeArray) and dtype is None:
            return a
        return self._wrap(np.array(a, dtype=dtype))

    def empty(self, shape, dtype=float):
        return self._wrap(np.empty(shape, dtype))

    def zeros(self, shape, dtype=float):
        return self._wrap(np.zeros(shape, dtype))

    def full(self, shape, value, dtype=float):
        return self._wrap(np.full(shape, value, dtype))

    def __getattr__(self, name):  # ufuncs and the rest: NumPy's, which keep FakeArray
        return getattr(np, name)
