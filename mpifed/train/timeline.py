"""A Chrome-trace timeline of each rank's steps (`run.timeline = true`), like Horovod's.

Open OUT/timeline.json in chrome://tracing or https://ui.perfetto.dev: one row per rank, with a
span for waiting on data, computing, and communicating in every step, so that a straggler (a
rank whose compute spans are longer, making the others' communication spans long) stands out.
A shard streamed in block-shuffled order adds a "data reader" row: one span per block read, with
its rows, bytes and MB/s, and a `read MB/s` counter.
"""

from __future__ import annotations

import json
import time

from ..data.atomic import atomic_path


class Timeline:
    """Spans recorded on this rank (times from time.perf_counter, seconds)."""

    def __init__(self, enabled: bool, rank: int):
        self.enabled, self.rank = enabled, rank
        self.origin = time.perf_counter()
        self.events: list[dict] = []

    def span(self, name: str, start: float, end: float, step: int) -> None:
        if self.enabled and end > start:
            self.events.append({"name": name, "cat": "step", "ph": "X", "pid": self.rank,
                                "tid": 0, "ts": (start - self.origin) * 1e6,
                                "dur": (end - start) * 1e6, "args": {"step": step}})

    def read(self, start: float, end: float, rows: int, nbytes: int) -> None:
        """Record one block read of the data reader thread: a span with its size and rate, and a
        `read MB/s` counter (the thread's own row in the trace, tid 1). Thread-safe."""
        if self.enabled and end > start:
            rate = nbytes / (end - start) / 1e6
            ts, dur = (start - self.origin) * 1e6, (end - start) * 1e6
            self.events.append({"name": "read", "cat": "data", "ph": "X", "pid": self.rank,
                                "tid": 1, "ts": ts, "dur": dur,
                                "args": {"rows": rows, "bytes": nbytes, "MB_per_s": rate}})
            self.events.append({"name": "read MB/s", "ph": "C", "pid": self.rank, "ts": ts,
                                "args": {"MB/s": rate}})

    def write(self, comm, path: str) -> None:
        """Gather every rank's spans to rank 0 and write one trace file (collective)."""
        if not self.enabled:
            return
        offset = comm.allreduce(self.origin, op=_min_op())  # a common zero for all ranks
        shift = (self.origin - offset) * 1e6
        for event in self.events:
            event["ts"] += shift
        gathered = comm.gather(self.events, root=0)
        if comm.rank == 0:
            events = [e for rank_events in gathered for e in rank_events]
            events += [{"name": "process_name", "ph": "M", "pid": r,
                        "args": {"name": f"rank {r}"}} for r in range(comm.size)]
            events += [{"name": "thread_name", "ph": "M", "pid": r, "tid": 1,
                        "args": {"name": "data reader"}} for r in range(comm.size)]
            with atomic_path(path) as tmp, open(tmp, "w") as fh:
                json.dump({"traceEvents": events, "displayTimeUnit": "ms"}, fh)


def _min_op():
    from mpi4py import MPI

    return MPI.MIN
