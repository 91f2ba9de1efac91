"""Horovod's stall check: a collective that has waited `timeout` seconds names the late ranks
and ends the job, instead of waiting forever for a rank that stopped answering.

The hot path only sets two attributes (`arm(step)` before a collective, `disarm()` after). A
watchdog thread looks at them a few times per timeout. When it fires, the ranks that can still
run tell each other (on their own duplicate of the communicator, with nonblocking messages)
that they are waiting, and at which step; the ranks that never answer are the late ones. The
lowest waiting rank prints them, and every waiting rank calls MPI_Abort.

    watch = StallWatch(comm, timeout=600)    # collective (duplicates comm); 0 turns it off
    watch.arm(step); allreduce(...); watch.disarm()
    watch.close()                            # local
"""

from __future__ import annotations

import sys
import threading
import time

from ..xp import background_thread
from . import lifetime

STALL_EXIT = 4  # the exit code of a job ended by the stall check
_TAG = 0x57A1


class StallWatch:
    """Watch one communicator's collectives; abort all ranks when one waits `timeout` s."""

    def __init__(self, comm, timeout: float, what: str = "all-reduce"):
        self.timeout, self.what = float(timeout), what
        self.since, self.step = None, None  # set while a collective is under way
        self._thread = None
        if self.timeout <= 0 or comm.size == 1:
            return
        self.comm = comm
        # the late-rank census never mixes with the job's messages; freed before MPI_Finalize
        self.side = lifetime.hold(comm.Dup())
        self._done = threading.Event()
        self._thread = background_thread(self._watch, "mpifed-stall")
        self._thread.start()

    def arm(self, step: int) -> None:
        """Mark the start of a collective of `step` (cheap: two attribute writes)."""
        self.step, self.since = step, time.monotonic()

    def disarm(self) -> None:
        self.since = None

    def close(self) -> None:
        """Stop the watchdog (local; safe in a `finally`)."""
        if self._thread is not None:
            self._done.set()
            self._thread.join()
            self._thread = None

    def _watch(self) -> None:
        poll = min(1.0, self.timeout / 4)
        checked = None
        while not self._done.wait(poll):
            since = self.since
            if since is not None and since != checked and time.monotonic() - since > self.timeout:
                self._fire(self.step)
                checked = since  # everyone was there: a slow collective; watch the next one

    def _fire(self, step) -> None:
        """Tell every rank we wait at `step`, hear who else does, report the rest, abort."""
        from mpi4py import MPI

        side, me = self.side, self.side.rank
        for other in range(side.size):
            if other != me:
                side.isend((me, step), dest=other, tag=_TAG)  # small: never waits for a reader
        heard = {me: step}
        deadline = time.monotonic() + min(10.0, max(2.0, self.timeout / 2))
        while time.monotonic() < deadline and len(heard) < side.size:
            if side.iprobe(source=MPI.ANY_SOURCE, tag=_TAG):
                rank, their_step = side.recv(source=MPI.ANY_SOURCE, tag=_TAG)
                heard[rank] = their_step
            else:
                time.sleep(0.01)
        late = [r for r in range(side.size) if r not in heard]
        if not late:
            return  # every rank is here after all: a slow collective, not a stall
        if me == min(heard):
            waiting = ", ".join(f"{r} (step {s})" for r, s in sorted(heard.items()))
            print(f"mpifed: error: stall: rank{'s' if len(late) > 1 else ''} "
                  f"{', '.join(map(str, late))} of {side.size} did not arrive in the {self.what} "
                  f"of step {step} within comm.stall_timeout = {self.timeout:g} s; waiting: "
                  f"{waiting}. Aborting the job.", file=sys.stderr, flush=True)
            time.sleep(0.5)  # give the launcher time to forward the line before the abort
        else:
            time.sleep(1.0)  # let the lowest waiting rank print, and its line travel, first
        MPI.COMM_WORLD.Abort(STALL_EXIT)
