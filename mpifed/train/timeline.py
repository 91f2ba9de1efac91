"""A Chrome-trace timeline of each rank's steps (`run.timeline = true`), like Horovod's.

Open OUT/timeline.json in chrome://tracing or https://ui.perfetto.dev: one row per rank, with
spans for waiting on data and computing in every step, and a row of the all-reduces where they
ran (during the backward pass under comm.overlap), so that a straggler (a rank whose compute
spans are longer, making the others' all-reduces long) stands out. A shard streamed in
block-shuffled order adds a "data reader" row: one span per block read, with its rows, bytes and
MB/s, and a `read MB/s` counter. A federation writes one trace per institution, of its own ranks
only, into OUT/institution-K/timeline.json: nothing of it is gathered across institutions.

Clocks. Each host's perf_counter counts from that host's boot, so ranks on different hosts do
not share a zero. At the start, every rank measures how far its MPI.Wtime is from rank 0's
(`clock_offsets`: ping-pong with rank 0, the sample with the shortest round trip, error at most
half that round trip; nothing to measure where MPI_WTIME_IS_GLOBAL says the clocks agree), and
every span is placed on rank 0's clock.

Events go to disk as they happen (one JSON line each, in a part file per rank beside the
trace), never held in memory; at the end rank 0 joins the parts into the trace (`write`). The
parts need a folder that every rank of the communicator sees (the run folder, as checkpoints).
"""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np

from ..data.atomic import atomic_path
from ..log import get_logger

log = get_logger(__name__)

# Thread ids (rows) of a rank in the trace.
STEPS, READER, COMM = 0, 1, 2
ROW_NAMES = {STEPS: "steps", READER: "data reader", COMM: "all-reduce"}
PINGS = 8  # round trips per rank when measuring clock offsets


class Timeline:
    """Spans recorded on this rank (times from time.perf_counter, seconds), streamed to `part`.

    enabled: record at all (run.timeline). part: this rank's event file (JSON lines); None
    keeps only the read totals (`read_count`, `read_bytes`, `read_seconds`), for benchmarks.
    base: seconds from the trace's zero (rank 0's clock at the start) to this rank's
    perf_counter reading `origin`.
    """

    def __init__(self, enabled: bool, rank: int, part: str | None = None, base: float = 0.0):
        self.enabled, self.rank, self.part = enabled, rank, part
        self.origin, self.base = time.perf_counter(), base
        self.read_count, self.read_bytes, self.read_seconds = 0, 0, 0.0
        self._lock = threading.Lock()  # the data reader thread records too
        self._fh = open(part, "w") if enabled and part is not None else None

    @classmethod
    def open(cls, enabled: bool, comm, path: str, clock=None) -> Timeline:
        """Return the timeline of this rank of `comm` for the trace `path`: clocks aligned on
        rank 0's (collective when enabled), events streamed to `path`.rank-R.part."""
        if not enabled:
            return cls(False, comm.rank)
        clock = clock or _wtime
        offset, _ = clock_offsets(comm, clock)
        origin, now = time.perf_counter(), clock()
        zero = np.array([now], dtype=np.float64)  # rank 0's clock reading is the trace's zero
        comm.Bcast(zero, root=0)
        timeline = cls(True, comm.rank, part_path(path, comm.rank),
                       base=(now - offset) - float(zero[0]))
        timeline.origin = origin
        return timeline

    def at(self, t: float) -> float:
        """Return perf_counter time `t` of this rank as microseconds on the trace's clock."""
        return (t - self.origin + self.base) * 1e6

    def span(self, name: str, start: float, end: float, step: int, tid: int = STEPS,
             unit: str = "step") -> None:
        """Record span `name` of `step` (a round where `unit` says so) from perf_counter
        `start` to `end` on row `tid`."""
        if self.enabled and end > start:
            self._emit({"name": name, "cat": unit, "ph": "X", "pid": self.rank, "tid": tid,
                        "ts": self.at(start), "dur": (end - start) * 1e6,
                        "args": {unit: step}})

    def read(self, start: float, end: float, rows: int, nbytes: int) -> None:
        """Record one block read of the data reader thread: a span with its size and rate, and a
        `read MB/s` counter (the thread's own row in the trace). Thread-safe."""
        if self.enabled and end > start:
            rate = nbytes / (end - start) / 1e6
            with self._lock:
                self.read_count += 1
                self.read_bytes += nbytes
                self.read_seconds += end - start
            ts = self.at(start)
            self._emit({"name": "read", "cat": "data", "ph": "X", "pid": self.rank,
                        "tid": READER, "ts": ts, "dur": (end - start) * 1e6,
                        "args": {"rows": rows, "bytes": nbytes, "MB_per_s": rate}})
            self._emit({"name": "read MB/s", "ph": "C", "pid": self.rank, "ts": ts,
                        "args": {"MB/s": rate}})

    def _emit(self, event: dict) -> None:
        if self._fh is not None:
            line = json.dumps(event) + "\n"
            with self._lock:
                self._fh.write(line)

    def close(self) -> None:
        """Close this rank's part file (local; safe to call twice)."""
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None

    def write(self, comm, path: str, env: dict | None = None) -> None:
        """Join every rank's part file into the trace `path` on rank 0 and remove the parts
        (collective). env: the run's environment fields (run_environment), kept as the trace's
        `otherData`; a rank's process is named "rank R" (its rank in `comm`)."""
        if not self.enabled:
            return
        self.close()
        comm.Barrier()  # every part is complete on disk
        if comm.rank == 0:
            join_parts(path, comm.size, env or {})


def trace_step(timeline, step: int, t_data: float, t_compute: float, step_fn,
               comm_before: float) -> None:
    """Record a step's data wait (from perf_counter `t_data`), its compute (from `t_compute`)
    and its all-reduces where they ran (the step's comm_spans); a step that keeps no spans gets
    its communication time since `comm_before` (its comm_seconds then) drawn at its end."""
    if timeline is None or not timeline.enabled:
        return
    end = time.perf_counter()
    spans, compute_end = step_fn.comm_spans, step_fn.compute_end
    if spans is None:
        comm = step_fn.comm_seconds - comm_before
        spans, compute_end = [(end - comm, end)], end - comm
    timeline.span("data", t_data, t_compute, step)
    timeline.span("compute", t_compute, compute_end, step)
    for start, stop in spans:
        timeline.span("allreduce", start, stop, step, COMM)


def part_path(path: str, rank: int) -> str:
    """Return rank `rank`'s part file of the trace `path`."""
    return f"{path}.rank-{rank}.part"


def join_parts(path: str, ranks: int, other: dict) -> None:
    """Write the trace `path` from the part files of `ranks` ranks, line by line (the parts are
    never read whole), then remove them; a part this host cannot see is named in a warning."""
    with atomic_path(path) as tmp, open(tmp, "w") as fh:
        fh.write('{"displayTimeUnit": "ms", "otherData": ' + json.dumps(other)
                 + ', "traceEvents": [\n')
        for rank in range(ranks):
            meta = [{"name": "process_name", "ph": "M", "pid": rank,
                     "args": {"name": f"rank {rank}"}}]
            meta += [{"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                      "args": {"name": name}} for tid, name in ROW_NAMES.items()]
            fh.write(",\n".join(json.dumps(m) for m in meta))
            try:
                with open(part_path(path, rank)) as part:
                    for line in part:
                        fh.write(",\n" + line.rstrip("\n"))
            except FileNotFoundError:
                log.warning("run.timeline: rank %d's events are not in %r (the run folder must be "
                            "one that every rank sees); the trace leaves them out", rank,
                            part_path(path, rank))
            fh.write(",\n" if rank < ranks - 1 else "\n")
        fh.write("]}\n")
    for rank in range(ranks):
        try:
            os.remove(part_path(path, rank))
        except FileNotFoundError:
            pass


def offset_estimate(samples) -> tuple[float, float]:
    """Return (the remote clock minus the local one, the round trip it was read in) from
    ping-pong samples (t_send, t_remote, t_receive): local, remote, local clock readings.

    The remote reading happened between the two local ones, so the true offset lies within
    half the round trip of t_remote - (t_send + t_receive) / 2; the shortest trip bounds best.
    """
    t_send, t_remote, t_receive = min(samples, key=lambda s: s[2] - s[0])
    return t_remote - (t_send + t_receive) / 2, t_receive - t_send


def clock_offsets(comm, clock=None, pings: int = PINGS) -> tuple[float, float]:
    """Return (this rank's `clock` minus rank 0's, in seconds; the round trip that bounds its
    error) on every rank of `comm` (collective; float64 buffers, nothing pickled).

    clock: a function returning seconds (default MPI.Wtime; tests inject shifted ones). Where
    MPI_WTIME_IS_GLOBAL says MPI.Wtime is one clock on every rank, (0, 0) without measuring.
    """
    if clock is None:
        if _wtime_is_global(comm):
            return 0.0, 0.0
        clock = _wtime
    result = np.zeros(2, dtype=np.float64)
    buf = np.zeros(1, dtype=np.float64)
    if comm.rank == 0:
        every = np.zeros((comm.size, 2), dtype=np.float64)
        for peer in range(1, comm.size):
            samples = []
            for _ in range(pings):
                t_send = clock()
                comm.Send(buf, dest=peer, tag=77)
                comm.Recv(buf, source=peer, tag=78)
                samples.append((t_send, float(buf[0]), clock()))
            every[peer] = offset_estimate(samples)
        comm.Scatter(every, result, root=0)
    else:
        for _ in range(pings):
            comm.Recv(buf, source=0, tag=77)
            buf[0] = clock()
            comm.Send(buf, dest=0, tag=78)
        comm.Scatter(None, result, root=0)
    return float(result[0]), float(result[1])


def _wtime_is_global(comm) -> bool:
    from mpi4py import MPI

    value = comm.Get_attr(MPI.WTIME_IS_GLOBAL)
    return bool(value)


def _wtime() -> float:
    from mpi4py import MPI

    return MPI.Wtime()
