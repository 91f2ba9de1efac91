"""What an institution keeps to itself under secure aggregation or DP: its leader's own record of
each round in OUT/institution-K/metrics.jsonl, and the count of bytes that leader sends.

The privacy rule: under federated.dp or secure aggregation only the masked or noised update, the
signed transcript and generic refusal codes leave an institution. Every figure about one
institution (its loss, accuracy, step count, bytes, timing) goes to that institution's own
folder, written by its leader on its own clock; the root's OUT/metrics.jsonl holds only what the
aggregate reveals. In this emulation every folder lies under one run.out; in a deployment each
institution's launcher has its own.
"""

from __future__ import annotations

import os

from ..comm.agree import raise_together
from ..errors import UserError
from ..federated.institutions import Federation
from .report import Reporter
from .timeline import Timeline


def institution_folder(out: str, institution: int) -> str:
    """Return institution k's own output folder, OUT/institution-K."""
    return os.path.join(out, f"institution-{institution}")


def open_institution_log(out: str, fed: Federation, private: bool, append: bool,
                         env: dict | None = None) -> Reporter | None:
    """Open this leader's OUT/institution-K/metrics.jsonl under privacy (None elsewhere: other
    ranks, and plain runs, whose reports go to the root anyway), its first record of this start
    the institution's `env` (institution_environment's fields). Collective over the world."""
    folder = institution_folder(out, fed.institution)

    def make():
        if private and fed.is_leader:
            try:
                os.makedirs(folder, exist_ok=True)
                reporter = Reporter(folder, True, 0, "none", append=append)
            except OSError as err:
                raise UserError(f"run.out: cannot write to {folder!r} ({err.strerror})") from None
            if env:
                reporter.record(event="environment", **env)
            return reporter
        return None
    return raise_together(fed.world, make)


def open_institution_trace(enabled: bool, out: str, fed: Federation) -> Timeline:
    """Return this rank's timeline of OUT/institution-K/timeline.json (run.timeline): the
    institution's own ranks only, their clocks aligned on its leader's; the folder made first
    (collective over the world; nothing of the trace crosses institutions)."""
    path = os.path.join(institution_folder(out, fed.institution), "timeline.json")
    if enabled:
        def make():
            if fed.site.rank == 0:
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                except OSError as err:
                    raise UserError(f"run.out: cannot write to {os.path.dirname(path)!r} "
                                    f"({err.strerror})") from None
        raise_together(fed.world, make)
    return Timeline.open(enabled, fed.site, path)


class SentBytes:
    """A communicator that counts the bytes of the buffers sent through it point to point
    (Send, Isend, Ssend); everything else is the wrapped communicator's.

    Wraps a leader's `leaders` communicator for the private aggregation, so that the leader's
    own record says what it sent, measured rather than derived."""

    def __init__(self, comm):
        self._comm, self.sent = comm, 0

    def _counted(self, name, buf, *args, **kwargs):
        self.sent += _nbytes(buf)
        return getattr(self._comm, name)(buf, *args, **kwargs)

    def Send(self, buf, *args, **kwargs):  # noqa: N802 (mpi4py's name)
        return self._counted("Send", buf, *args, **kwargs)

    def Isend(self, buf, *args, **kwargs):  # noqa: N802
        return self._counted("Isend", buf, *args, **kwargs)

    def Ssend(self, buf, *args, **kwargs):  # noqa: N802
        return self._counted("Ssend", buf, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._comm, name)


def _nbytes(buf) -> int:
    """Return the bytes of an mpi4py buffer argument: an array or [array, datatype]."""
    if isinstance(buf, (list, tuple)):
        buf = buf[0]
    return int(getattr(buf, "nbytes", 0))
