"""MPI-3 shared-memory windows: arrays that every rank of a node can read and write directly.

`shared_array(n, dtype, comm)` allocates, collectively over the ranks of `comm` on this node,
one segment per rank; each rank gets its own segment as a NumPy array, and the hierarchical
all-reduce reaches the other ranks' segments with no message at all.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from . import lifetime

_window_ids = itertools.count(1)  # a window's number: agreed over its node when made


@dataclass
class SharedWindow:
    """A window of one segment per node rank, in a passive-target epoch (Lock_all) for life."""

    node: MPI.Comm
    win: MPI.Win
    segments: list  # segments[r]: rank r's segment, as a flat uint8 array
    ident: int
    _views: dict = field(default_factory=dict)

    @classmethod
    def allocate(cls, node, nbytes: int) -> SharedWindow:
        """Collective over `node`: give every rank a segment of `nbytes` bytes."""
        win = MPI.Win.Allocate_shared(max(nbytes, 1), 1, comm=node)
        segments = []
        for rank in range(node.size):
            memory, _ = win.Shared_query(rank)
            segments.append(np.frombuffer(memory, dtype=np.uint8, count=max(nbytes, 1)))
        win.Lock_all()
        return cls(node, win, segments, _agreed_ident(node))

    @property
    def nbytes(self) -> int:
        return self.segments[0].size

    def views(self, dtype, count: int, offset: int = 0) -> list:
        """Return every rank's segment as `count` elements of `dtype` from byte `offset`."""
        key = (dtype, count, offset)
        found = self._views.get(key)
        if found is None:  # a training step asks for the same views every time
            size = count * np.dtype(dtype).itemsize
            found = self._views[key] = [seg[offset:offset + size].view(dtype)
                                        for seg in self.segments]
        return found

    def scratch(self, dtype, nbytes: int):
        """Return a reusable private array of `nbytes` (the block of a running sum)."""
        key = ("scratch", dtype)
        found = self._views.get(key)
        if found is None:
            found = self._views[key] = np.empty(max(1, nbytes // np.dtype(dtype).itemsize), dtype)
        return found

    def fence(self) -> None:
        """Make every rank's stores visible to all (MPI-3 unified model: sync, barrier, sync)."""
        self.win.Sync()
        self.node.Barrier()
        self.win.Sync()

    def free(self) -> None:
        """Free the window (collective over `node`); a second call does nothing."""
        if self.win == MPI.WIN_NULL:
            return
        _registry.pop(self.segments[self.node.rank].ctypes.data, None)
        _live_idents.discard(self.ident)
        if _last_lookup[1] is self:
            _last_lookup[:] = [None, None, 0]
        lifetime.let_go(self)
        self.segments, self._views = [], {}
        self.win.Unlock_all()
        self.win.Free()


def _agreed_ident(node) -> int:
    """Return the new window's number, the same on every rank of `node` (collective): the
    largest next number among them, so that ranks which made windows on other communicators
    (a sub-communicator's hierarchical all-reduce) still agree on this one's."""
    global _window_ids
    proposal = np.array([next(_window_ids)], dtype=np.int64)
    node.Allreduce(MPI.IN_PLACE, proposal, op=MPI.MAX)
    ident = int(proposal[0])
    _window_ids = itertools.count(ident + 1)
    return ident


_registry: dict[int, SharedWindow] = {}  # segment base address -> its window (own segment)
_live_idents: set[int] = set()


def shared_array(count: int, dtype, node) -> np.ndarray:
    """Allocate a 1-D array in a new shared window of `node` (collective); return this rank's.

    node: a communicator of ranks on one node (mpifed.comm.topology.node_comm). An all-reduce
    with algorithm "hierarchical" on such arrays reduces straight from the other ranks' memory.
    """
    dtype = np.dtype(dtype)
    window = SharedWindow.allocate(node, count * dtype.itemsize)
    own = window.segments[node.rank]
    _registry[own.ctypes.data] = window
    _live_idents.add(window.ident)
    lifetime.hold(window)  # freed before MPI_Finalize if the caller never releases it
    return own[:count * dtype.itemsize].view(dtype)


_last_lookup: list = [None, None, 0]  # [array, window, offset]: a step asks for the same one


def window_of(array) -> tuple[SharedWindow | None, int]:
    """Return (window, byte offset) when `array` lies in this rank's segment of a shared window."""
    if array is _last_lookup[0] and _last_lookup[1] is not None \
            and _last_lookup[1].ident in _live_idents:
        return _last_lookup[1], _last_lookup[2]
    if not isinstance(array, np.ndarray) or not _registry:
        return None, 0
    address = array.__array_interface__["data"][0]
    for base, window in _registry.items():
        if base <= address and address + array.nbytes <= base + window.nbytes:
            _last_lookup[:] = [array, window, address - base]
            return window, address - base
    return None, 0


def release(array) -> None:
    """Free the window that `shared_array` made for `array` (collective over its node)."""
    window, _ = window_of(array)
    if window is not None:
        window.free()
