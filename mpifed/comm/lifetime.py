"""What mpifed holds from MPI, and its release before MPI_Finalize even when a script forgot.

Shared windows, split communicators and scratch windows cached on communicators all belong to
the MPI library. Left alive into MPI_Finalize, a shared window keeps libfabric's endpoints busy
and the TCP netmod fails with `OFI call fabricclose failed (Device or resource busy)`, exit 15,
on every rank. So every such object is registered here as it is made, and `release_all()` frees
what is left, newest first (the reverse of the collective order in which all ranks made them):

- from an `atexit` hook, registered when this module is imported, after mpi4py's own exit hook
  (mpi4py finalizes MPI from `Py_AtExit`, which runs after every `atexit` hook);
- from the delete callback of an attribute on `MPI.COMM_SELF`, which MPI calls at the start of
  MPI_Finalize, for scripts that call `MPI.Finalize()` themselves.

Values cached on a communicator (`cache(comm, keyval, value)`, with keyvals from `keyval()`) are
freed by the keyval's delete callback when the communicator is freed, when the attribute is
deleted, or here. Freeing is collective, as making was: all ranks release alike.
"""

from __future__ import annotations

import atexit
import itertools

from mpi4py import MPI

_held: dict[int, object] = {}  # ticket -> object with .free(), in the order they were made
_cached: dict[tuple, int] = {}  # (comm handle, keyval) -> ticket of the cached attribute
_tickets = itertools.count(1)


class _Attribute:
    """A cached attribute (comm, keyval) whose freeing is deleting it (MPI calls the callback)."""

    def __init__(self, comm, keyval: int):
        self.comm, self.keyval = comm, keyval

    def free(self) -> None:
        if self.comm != MPI.COMM_NULL:
            self.comm.Delete_attr(self.keyval)


def hold(thing) -> object:
    """Register `thing` (a communicator, or anything with .free()) to be freed before
    MPI_Finalize; return it."""
    _held[next(_tickets)] = thing
    return thing


def let_go(thing) -> None:
    """Forget `thing` (its owner freed it)."""
    for ticket, held in list(_held.items()):
        if held is thing:
            del _held[ticket]


def free_value(value) -> None:
    """Free the MPI objects in a cached value: communicators, windows, tuples/lists/dicts of them."""
    if isinstance(value, (tuple, list)):
        for item in reversed(value):
            free_value(item)
    elif isinstance(value, dict):
        for item in reversed(list(value.values())):
            free_value(item)
    elif isinstance(value, MPI.Comm):
        if value != MPI.COMM_NULL and value not in (MPI.COMM_WORLD, MPI.COMM_SELF):
            value.Free()
    elif hasattr(value, "free") and callable(value.free):
        value.free()


def _delete(comm, keyval, value) -> None:
    """The delete callback of mpifed's keyvals: free what the attribute holds."""
    ticket = _cached.pop((comm.py2f(), keyval), None)
    if ticket is not None:
        _held.pop(ticket, None)
    free_value(value)


def keyval() -> int:
    """Return a new communicator keyval whose attributes are freed with the communicator."""
    return MPI.Comm.Create_keyval(delete_fn=_delete)


def cache(comm, key: int, value) -> object:
    """Set attribute `key` (from keyval()) of `comm` to `value`, freed before MPI_Finalize."""
    comm.Set_attr(key, value)
    ticket = next(_tickets)
    _cached[(comm.py2f(), key)] = ticket
    _held[ticket] = _Attribute(comm, key)
    return value


def release_all() -> int:
    """Free everything still held, newest first; return how many objects were freed."""
    freed = 0
    if not MPI.Is_initialized() or MPI.Is_finalized():
        _held.clear()
        return 0
    while _held:
        ticket = max(_held)
        free_value(_held.pop(ticket))
        freed += 1
    return freed


def held() -> int:
    """Return how many MPI objects mpifed holds now (for tests)."""
    return len(_held)


def _at_finalize(comm, keyval, value) -> None:
    release_all()


def _watch_finalize() -> None:
    """Put an attribute on COMM_SELF whose deletion (first step of MPI_Finalize) frees all."""
    if MPI.Is_initialized() and not MPI.Is_finalized():
        key = MPI.Comm.Create_keyval(delete_fn=_at_finalize)
        MPI.COMM_SELF.Set_attr(key, True)


atexit.register(release_all)
_watch_finalize()
