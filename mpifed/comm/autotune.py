"""The measured choice behind "auto": time each algorithm that can run here at the sizes a run
will use, on its own communicator, and keep the fastest for each power-of-two size bucket.

    >>> table, seconds = measure(comm, [1 << 16, 1 << 20], buffer_for)  # collective
    >>> table                                    # the same dict on every rank
    {65536: 'mpi', 1048576: 'ring'}
    >>> install(comm, table)    # allreduce(buf, comm, algorithm="auto") now follows it

A bucket's time for an algorithm is the median over calls of the slowest rank's time of each
call (a step waits for its slowest rank), all-reduced before anyone decides: every rank holds
the same numbers and picks the same algorithm, so no rank can run the ring while another waits
in MPI_Allreduce. Small buckets get more calls than large ones, and a close call (the runner-up
within 10%) is timed again with more calls. Only host arrays are measured: NCCL never moves host
arrays, and device buffers keep the rule of `collectives.choose_algorithm`. Reading and writing
the per-topology cache is the caller's (mpifed/train/allreduce_choice.py): it writes files.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from ..choices import ALGORITHMS
from .hierarchical import hierarchical_allreduce
from .native import mpi_allreduce
from .ring import ring_allreduce
from .shared import release, shared_array
from .topology import topology

# What can be measured on host arrays, in the order that breaks a tie (the first wins).
MEASURED = {"ring": ring_allreduce, "mpi": mpi_allreduce, "hierarchical": hierarchical_allreduce}
REPEATS = 5  # the fewest timed calls per algorithm and bucket, after one warm-up call each
MOST_REPEATS = 11  # small buckets get more calls: repeats_for
REPEAT_BYTES = 8 << 20  # a bucket of b bytes gets about REPEAT_BYTES / b calls
CLOSE = 1.10  # a runner-up this close to the fastest is timed again: bucket_medians

# The table installed on a communicator: a plain dict, nothing to free with it.
_TABLE = MPI.Comm.Create_keyval()


def bucket_bytes(nbytes: int) -> int:
    """Return the power of two nearest to `nbytes` on a log scale (1 for 0 or 1 bytes).

    A bucket b holds the sizes in [b/sqrt(2), b*sqrt(2)): a measurement at b stands for them all,
    and a buffer measured at its bucket is at most 1.42 times the real one.
    """
    if nbytes <= 1:
        return 1
    lower = 1 << (int(nbytes).bit_length() - 1)
    return lower if nbytes * nbytes < 2 * lower * lower else 2 * lower


def repeats_for(nbytes: int) -> int:
    """Return the timed calls per algorithm at a bucket of `nbytes`: REPEAT_BYTES / nbytes,
    between REPEATS and MOST_REPEATS. Small buckets are cheap to time and noisier relative to
    their length (one scheduler hiccup is a whole call); 2 MiB and more get REPEATS. (32 MiB
    and up to 31 calls cost 5-10x the old start-up, up to 0.1 s a bucket on 4 ranks of a
    2-core machine, paid by every test run that trains, and the sweeps with them still missed
    the 1.1x goal: docs/performance.md.)"""
    return int(min(MOST_REPEATS, max(REPEATS, REPEAT_BYTES // max(nbytes, 1))))


def candidates(comm) -> tuple[str, ...]:
    """Return the algorithms worth timing on host arrays over `comm` (collective the first time).

    The hierarchical all-reduce only where nodes hold several ranks, the same number each:
    elsewhere it runs the ring itself.
    """
    node, cross = topology(comm)
    hierarchical = cross is not None and node.size > 1
    return tuple(a for a in MEASURED if a != "hierarchical" or hierarchical)


def time_allreduce(algorithm: str, buf, comm) -> float:
    """Return the seconds one mean all-reduce of `buf` with `algorithm` takes on this rank,
    starting together after a barrier."""
    comm.Barrier()
    start = time.perf_counter()
    MEASURED[algorithm](buf, comm, "mean", check=False)
    return time.perf_counter() - start


def call_orders(count: int, calls: int, seed) -> list[list[int]]:
    """Return `calls` random orders of range(count), the same for the same `seed` (so on every
    rank): noise hits every algorithm alike, none always goes first, and none always follows
    the same one (a rotation keeps each one's predecessor fixed, and what ran just before, such
    as the hierarchical all-reduce's copies, can slow the next call). Pure."""
    rng = np.random.default_rng(seed)
    return [[int(i) for i in rng.permutation(count)] for _ in range(calls)]


def call_times(comm, buf, algorithms, timer, repeats: int, warm: bool = True) -> np.ndarray:
    """Return the slowest rank's seconds of each call, (len(algorithms), repeats), the same
    array on every rank (one MAX all-reduce): a step waits for its slowest rank on every call.

    warm: call each algorithm once unmeasured first (scratch windows, first touch of the
    pages). Each repetition runs the algorithms in a random order (call_orders), the same on
    every rank, so call i is the same call everywhere.
    """
    if warm:
        for algorithm in algorithms:
            timer(algorithm, buf, comm)
    local = np.empty((len(algorithms), repeats))
    orders = call_orders(len(algorithms), repeats, [buf.nbytes, int(warm)])  # alike everywhere
    for repeat, order in enumerate(orders):
        for j in order:
            local[j, repeat] = timer(algorithms[j], buf, comm)
    slowest = np.empty_like(local)
    comm.Allreduce(local, slowest, op=MPI.MAX)
    return slowest


def close_call(row: np.ndarray) -> list[int] | None:
    """Return the indices of the fastest two of `row` (median seconds per algorithm) when the
    runner-up is within CLOSE of the fastest, else None. Pure."""
    if len(row) < 2:
        return None
    first, second = (int(i) for i in np.argsort(row, kind="stable")[:2])
    return sorted([first, second]) if row[second] <= CLOSE * row[first] else None


def bucket_medians(comm, nbytes: int, algorithms, buffer_for, timer, repeats) -> np.ndarray:
    """Return the median over calls of the slowest rank's seconds, per algorithm, at one bucket.

    When the fastest two are within CLOSE of each other, those two are timed again with twice
    the calls (a close call is where noise decides, and where a wrong choice costs up to 10%),
    and their medians are taken over all their calls. Collective; equal on every rank.
    """
    count = repeats_for(nbytes) if repeats is None else repeats
    buf = buffer_for(nbytes)
    samples = call_times(comm, buf, algorithms, timer, count)
    medians = np.median(samples, axis=1)
    pair = close_call(medians)
    if pair is not None and repeats is None:
        more = call_times(comm, buf, [algorithms[j] for j in pair], timer, 2 * count,
                          warm=False)
        for row, j in zip(more, pair):
            medians[j] = float(np.median(np.concatenate([samples[j], row])))
    return medians


def decide(buckets, algorithms, seconds: np.ndarray) -> dict[int, str]:
    """Return {bucket: the fastest algorithm}; ties go to the algorithm listed first. Pure."""
    return {int(b): algorithms[int(np.argmin(row))] for b, row in zip(buckets, seconds)}


def measure(comm, buckets, buffer_for, *, timer=time_allreduce, repeats: int | None = None):
    """Time each candidate algorithm at each bucket; return (table, seconds), equal on all ranks.

    buckets: sizes in bytes, the same list on every rank. buffer_for(nbytes): a 1-D host array
    of about that many bytes, of the kind the run reduces (a window array or not).
    timer(algorithm, buf, comm): seconds of one call (tests inject their own).
    repeats: timed calls per algorithm and bucket; None: repeats_for(bucket), and close calls
    timed again (bucket_medians).
    table: {bucket: algorithm}; seconds: {bucket: {algorithm: median over calls of the slowest
    rank's seconds}}. Collective over `comm`: a few seconds on slow links, once per topology.
    """
    if repeats is not None and (isinstance(repeats, bool) or not isinstance(repeats, int)
                                or repeats < 1):
        raise ValueError(f"repeats: expected None or an int >= 1, got {repeats!r}")
    buckets = [int(b) for b in buckets]
    algorithms = candidates(comm)
    slowest = np.array([bucket_medians(comm, b, algorithms, buffer_for, timer, repeats)
                        for b in buckets]).reshape(len(buckets), len(algorithms))
    seconds = {b: dict(zip(algorithms, map(float, row))) for b, row in zip(buckets, slowest)}
    return decide(buckets, algorithms, slowest), seconds


class Scratch:
    """The buffers to measure in: views of one window array of the largest bucket's size (a
    step's window gradient buffer, or its per-layer ranges), or for ordinary arrays a fresh
    array per bucket, as a step without overlap reduces its own gradient array.

    Why fresh: the hierarchical all-reduce of ordinary arrays (which copies through a window)
    ran up to 2x slower on a view of one 64 MiB array than on an array of the view's own size
    (1 x 2 ranks, 128-256 KiB, measured side by side), which made auto pass it over where it
    was the fastest. `free()` is collective over the node for a window (so not in a `finally`).
    """

    def __init__(self, comm, largest: int, dtype, window: bool):
        self.dtype = np.dtype(dtype)
        self.window = window
        self.buf = None
        if window:
            count = max(1, largest // self.dtype.itemsize)
            self.buf = shared_array(count, self.dtype, topology(comm)[0])
            self.buf[...] = 0

    def __call__(self, nbytes: int):
        """Return a buffer of `nbytes` bytes (at least one element)."""
        count = max(1, nbytes // self.dtype.itemsize)
        if self.window:
            return self.buf[:count]
        return np.zeros(count, dtype=self.dtype)

    def free(self) -> None:
        if self.window:
            release(self.buf)


def encode(table: dict) -> list[int]:
    """Return `table` as ints: bucket, index into choices.ALGORITHMS, bucket, index, ..."""
    return [v for b, a in sorted(table.items()) for v in (int(b), ALGORITHMS.index(a))]


def decode(values) -> dict[int, str]:
    """Return the table `encode` wrote; ValueError on a malformed list."""
    if len(values) % 2 or any(not 0 <= i < len(ALGORITHMS) for i in values[1::2]):
        raise ValueError(f"not an encoded all-reduce table: {list(values)[:8]}")
    return {int(b): ALGORITHMS[i] for b, i in zip(values[::2], values[1::2])}


class Table(dict):
    """{bucket bytes: algorithm} as measured, and each exact byte count's choice once resolved.

    A call of allreduce(..., "auto") looks its size up in `by_nbytes` (one dict lookup): the
    bucket is worked out once per size, not on every call, since at 64 KiB the few microseconds
    of a full choice are a tenth of MPI_Allreduce's own time.
    """

    __slots__ = ("by_nbytes",)

    def __init__(self, table: dict):
        super().__init__(table)
        self.by_nbytes = {}  # nbytes -> algorithm, filled by `algorithm`

    def algorithm(self, nbytes: int) -> str | None:
        """Return the measured algorithm for a buffer of `nbytes`, or None where the table has
        no entry for its bucket (the fixed rule decides those)."""
        chosen = self.by_nbytes.get(nbytes)
        if chosen is None:
            chosen = self.get(bucket_bytes(nbytes))
            if chosen is not None:
                self.by_nbytes[nbytes] = chosen
        return chosen


def install(comm, table: dict | None) -> None:
    """Make "auto" on `comm` follow `table` ({bucket bytes: algorithm}); None removes it.

    Must be the same table on every rank (as `measure` returns it): the choice then depends
    only on a buffer's size, as the fixed rule does.
    """
    if table is None:
        if comm.Get_attr(_TABLE) is not None:
            comm.Delete_attr(_TABLE)
        return
    comm.Set_attr(_TABLE, Table(table))


def installed(comm) -> Table | None:
    """Return the table "auto" follows on `comm`, or None (the fixed rule)."""
    return comm.Get_attr(_TABLE)
