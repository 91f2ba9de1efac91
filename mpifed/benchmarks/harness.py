"""The one benchmark harness: the timing loop, the warm-up default, the JSON record and the table
that every `mpifed bench` benchmark of training steps or rounds uses, for ours and every peer.

    timing = time_steps(step, steps=150, warmup=WARMUP, sync=barrier_sync(comm),
                        samples_per_step=128 * comm.size)
    record = Record.build("throughput", "mpifed", "ours", comm.size, {"batch": 128}, [timing])
    append_records("runs.jsonl", [record])          # one JSON object per line, appended

Why one harness: a figure that compares two systems means something only when both were warmed
up alike and timed by the same clock between the same synchronisations; with one loop that holds
by construction instead of by review.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import NamedTuple

WARMUP = 10  # training steps every benchmark runs before timing, for ours and every peer alike


@dataclass(frozen=True)
class Timing:
    """What `time_steps` measured: seconds per step (wall, perf_counter) and CPU seconds per
    step (this process, process_time), one entry per repeat; `probe`: the increase per step of
    the probe's running total (e.g. seconds in communication), one per repeat, or empty."""

    warmup: int
    steps: int
    samples_per_step: int
    seconds: list[float]
    cpu_seconds: list[float]
    probe: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def samples_per_second(self) -> float:
        """Samples per second of the best repeat."""
        return self.samples_per_step / self.best

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Timing:
        return cls(**data)


def check_counts(steps: int, warmup: int, repeats: int = 1) -> None:
    """Refuse counts that cannot time anything, naming the option to change."""
    if steps < 1 or repeats < 1 or warmup < 0:
        raise ValueError(f"benchmark: need --steps >= 1, --repeats >= 1 and --warmup >= 0 "
                         f"(got {steps}, {repeats}, {warmup}); raise the one that is too low")


def time_steps(step: Callable[[int], object], steps: int, warmup: int = WARMUP, repeats: int = 1,
               sync: Callable[[], object] | None = None, samples_per_step: int = 1,
               probe: Callable[[], float] | None = None) -> Timing:
    """Call `step(i)` `warmup` times, then `steps` times per repeat, timed; return the Timing.

    step: one training step (or round); `i` counts every call from 0, warm-up included, so a
    step can pick its batch and learning rate from it.
    sync: called after the warm-up and at both ends of every timed repeat, inside the timed
    span (a barrier over the ranks, a CUDA synchronise, or both: `barrier_sync`), so that every
    rank's time is the slowest rank's and no queued GPU work escapes the clock.
    probe: a running total read at both ends of each repeat (Timing.probe holds its increase).
    """
    check_counts(steps, warmup, repeats)
    sync = sync or (lambda: None)
    calls = 0
    for _ in range(warmup):
        step(calls)
        calls += 1
    seconds, cpu, probed = [], [], []
    for _ in range(repeats):
        sync()
        before = probe() if probe else 0.0
        start, cpu_start = time.perf_counter(), time.process_time()
        for _ in range(steps):
            step(calls)
            calls += 1
        sync()
        seconds.append((time.perf_counter() - start) / steps)
        cpu.append((time.process_time() - cpu_start) / steps)
        if probe:
            probed.append((probe() - before) / steps)
    return Timing(warmup, steps, samples_per_step, seconds, cpu, probed)


class Steps(NamedTuple):
    """One side of a benchmark (ours or a peer), as `time_steps` takes it."""

    step: Callable[[int], object]  # step(i): one training step, i counting from 0
    sync: Callable[[], object]  # the device, then a barrier (barrier_sync)
    comm_seconds: Callable[[], float] | None = None  # running total in communication, if known


def measure(steps_of: Steps, steps: int, warmup: int, samples_per_step: int) -> dict:
    """Time `steps_of` with time_steps (one repeat); return the JSON a benchmark worker prints:
    samples_per_s, comm_fraction (None where unknown), the timing and the machine's facts."""
    timing = time_steps(steps_of.step, steps, warmup, sync=steps_of.sync,
                        samples_per_step=samples_per_step, probe=steps_of.comm_seconds)
    comm = timing.probe[0] / timing.seconds[0] if timing.probe else None
    return {"samples_per_s": timing.samples_per_second, "comm_fraction": comm,
            "timing": timing.to_dict(), "machine": machine_facts()}


def barrier_sync(comm, device_sync: Callable[[], object] | None = None) -> Callable[[], None]:
    """Return the sync for `time_steps` on the ranks of `comm`: the device first (its queued
    work), then a barrier."""
    def sync() -> None:
        if device_sync is not None:
            device_sync()
        comm.Barrier()
    return sync


def warmup_rounds(warmup_steps: int, steps_per_round: int) -> int:
    """Return the whole rounds that cover `warmup_steps` training steps (round-based
    benchmarks discard these first, so --warmup means steps everywhere)."""
    return -(-warmup_steps // max(1, steps_per_round))


@dataclass
class Record:
    """One benchmark result in the one JSON format (`to_dict`, `append_records`).

    system: "mpifed" or the peer ("torch-ddp"); impl: the row's name in the printed table
    ("ours", "ours-overlap", "torch"); unit: what one step is ("step", "round");
    warmup, steps: units run before timing and timed per repeat; seconds: seconds per unit, one
    per repeat (repeats may be separate launches); samples_per_second: of the best repeat, or
    None where the unit has no fixed sample count; metrics: further measured values
    (comm_fraction, bytes); config: the parameters that define the run.
    """

    benchmark: str
    system: str
    impl: str
    ranks: int
    config: dict
    unit: str
    warmup: int
    steps: int
    repeats: int
    seconds: list[float]
    median: float
    best: float
    samples_per_second: float | None
    cpu_seconds: list[float]
    metrics: dict
    machine: dict
    command: str
    timestamp: str
    environment: dict = field(default_factory=dict)  # bench_environment's fields

    @classmethod
    def build(cls, benchmark: str, system: str, impl: str, ranks: int, config: dict,
              timings: list[Timing], metrics: dict | None = None, machine: dict | None = None,
              unit: str = "step") -> Record:
        """Return the record of `timings` (one per launch, same warm-up and steps), their
        repeats pooled; machine: facts from where the steps ran (default: this process)."""
        if not timings or len({(t.warmup, t.steps, t.samples_per_step) for t in timings}) != 1:
            raise ValueError(f"{benchmark} {impl}: records pool timings of the same warm-up, "
                             "steps and samples per step; got "
                             f"{[(t.warmup, t.steps, t.samples_per_step) for t in timings]}")
        from ..train.environment import bench_environment

        seconds = [s for t in timings for s in t.seconds]
        first = timings[0]
        machine = machine if machine is not None else machine_facts()
        rate = first.samples_per_step / min(seconds) if first.samples_per_step else None
        return cls(benchmark, system, impl, ranks, dict(config), unit, first.warmup, first.steps,
                   len(seconds), seconds, statistics.median(seconds), min(seconds), rate,
                   [c for t in timings for c in t.cpu_seconds], dict(metrics or {}),
                   machine, command_line(),
                   datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   bench_environment(ranks, dict(config), machine.get("hosts") or
                                     [machine.get("hostname") or socket.gethostname()],
                                     machine.get("mpi_library")))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Record:
        missing = [f for f in FIELDS if f not in data and f not in OPTIONAL]
        if missing:
            raise ValueError(f"benchmark record: missing {missing}; was it written by "
                             "mpifed.benchmarks.harness.append_records?")
        return cls(**{f: data[f] for f in FIELDS if f in data})


FIELDS = tuple(f.name for f in fields(Record))
OPTIONAL = ("environment",)  # records written before it came read with it empty


def append_records(path: str, records: list[Record]) -> None:
    """Append each record to `path` as one JSON object per line (JSON Lines): runs of
    several benchmarks, or of one on several days, accumulate in one file."""
    with open(path, "a") as fh:
        for record in records:
            fh.write(json.dumps(record.to_dict()) + "\n")


def read_records(path: str) -> list[Record]:
    """Return the records of a JSON Lines file that append_records wrote."""
    with open(path) as fh:
        return [Record.from_dict(json.loads(line)) for line in fh if line.strip()]


def command_line() -> str:
    """Return this process's command line, quoted for a shell."""
    return shlex.join([os.path.basename(sys.executable), *sys.argv])


def machine_facts() -> dict:
    """Return the facts a figure needs beside it: host, CPUs, Python, NumPy, MPI library,
    and torch's version where the peer ran in this process."""
    import numpy

    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    facts = {"hostname": socket.gethostname(), "cpu_count": os.cpu_count(),
             "cpus_usable": len(cpus) if cpus is not None else os.cpu_count(),
             "platform": platform.platform(), "python": platform.python_version(),
             "numpy": numpy.__version__, "mpi_library": mpi_library_version()}
    if "torch" in sys.modules:
        facts["torch"] = sys.modules["torch"].__version__
    return facts


def mpi_library_version() -> str | None:
    """Return the first line of MPI_Get_library_version. A process that only launches mpiexec
    asks a child Python, so that it does not start MPI itself."""
    if "mpi4py.MPI" in sys.modules:
        return sys.modules["mpi4py.MPI"].Get_library_version().splitlines()[0].strip()
    code = "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0].strip())"
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


@dataclass(frozen=True)
class Column:
    """One column of a printed table: its header, width, alignment ('<' or '>') and the
    function that gives a row's cell text."""

    header: str
    width: int
    text: Callable[[dict], str]
    align: str = ">"


def print_table(columns: list[Column], rows: list[dict], title: str | None = None) -> None:
    """Print `rows` under a '# ' header line (and title line); each row indented by two."""
    if title:
        print(f"# {title}")
    print("# " + " ".join(f"{c.header:{c.align}{c.width}}" for c in columns))
    for row in rows:
        print(format_row(columns, row))


def format_row(columns: list[Column], row: dict) -> str:
    """Return one row of a table as print_table prints it (for rows printed as they come)."""
    return "  " + " ".join(f"{c.text(row):{c.align}{c.width}}" for c in columns)
