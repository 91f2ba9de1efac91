"""Streamed and shuffled against in-memory shuffled training.

    python bench/streaming.py [--rounds 8] [--chunk 25] [--warmup 10] [--ranks 1 2] [--warm]
    mpifed bench streaming [...] [--records runs.jsonl]         (the same)

MLP 784-512-256-10 (float32), batch 128 per rank, SGD with momentum, one BLAS thread per rank, on
a file written by `mpifed data synth` (200,000 x 784 by default, ~1 MiB chunks), for 1 and 2
ranks. Each rank count is one mpiexec run in which three loaders of the same rows take turns, a
stretch of --chunk steps each, round after round, on the same model and data-parallel step:

  in memory, shuffled     the shard held in memory, a full permutation per epoch
  streamed, in order      the shard read from the file per batch (MPIFED_SHARD_MEMORY_BYTES=1)
  streamed, shuffled      the same, in block-shuffled order (a reader thread, whole blocks)

Taking turns in one run exposes all three to the same load, which matters on a shared machine.
Every turn is timed by the one harness (harness.py), between two barriers; each loader's first
turn starts with --warmup untimed steps, so all three warm up alike. The page cache is dropped
(`sync; echo 1 > /proc/sys/vm/drop_caches`) after the in-memory shard is loaded and before the
streamed ones open, where this process may (root); else the data file alone leaves it
(posix_fadvise DONTNEED). A run reads less than an epoch of each streamed shard, so every
streamed read comes from the disk. Prints samples/s per loader, the time steps waited for data,
the CPU time per step of the whole rank (all its threads; with 2 ranks it includes MPI's busy
waiting), the block read size and rate (from the timeline), and streamed-shuffled / in-memory
samples/s. --records appends one harness record per loader and rank count (JSON Lines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

from ..launch import mpiexec_command
from .harness import (
    WARMUP,
    Column,
    Record,
    Timing,
    append_records,
    barrier_sync,
    check_counts,
    format_row,
    machine_facts,
    print_table,
    time_steps,
)

HIDDEN, BATCH = [512, 256], 128
LOADERS = ("in memory, shuffled", "streamed, in order", "streamed, shuffled")


def drop_page_cache(path: str) -> str:
    """Evict `path` from the page cache; return how ("drop_caches", "fadvise" or why not)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1\n")
        return "drop_caches"
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"
    except (OSError, AttributeError) as err:
        return f"not dropped ({err})"


def open_loaders(comm, data: str, per_epoch: int, timeline):
    """Return the three loaders of this rank's shard, and how the page cache was dropped."""
    from ..data.shards import Shard, describe, shard_bounds
    from ..data.stream import Prefetcher, shard_stream

    info = describe(data)
    start, stop = shard_bounds(info.samples, comm.size, comm.rank)
    os.environ.pop("MPIFED_SHARD_MEMORY_BYTES", None)
    held = Shard(info, start, stop)
    comm.Barrier()
    cache = None
    if comm.rank == 0:
        cache = "kept (--warm)" if os.environ.get("BENCH_WARM") else drop_page_cache(data)
    comm.Barrier()
    os.environ["MPIFED_SHARD_MEMORY_BYTES"] = "1"
    streamed = [Shard(info, start, stop), Shard(info, start, stop)]
    assert held.x is not None and streamed[0].x is None

    def loader(shard, shuffle, trace=None):
        stream = shard_stream(shard, BATCH, per_epoch, 0, comm.rank, shuffle, timeline=trace)
        return Prefetcher(shard, stream, lambda a: a)

    loaders = [loader(held, True), loader(streamed[0], False),
               loader(streamed[1], True, timeline)]
    return loaders, [held, *streamed], comm.bcast(cache, root=0)


def take_turns(loaders, step_fn, optimizer, comm, rounds: int, chunk: int,
               warmup: int) -> list[Timing]:
    """Train with the loaders taking turns of `chunk` steps, each turn timed by the harness;
    return one Timing per loader, a repeat per turn (each loader's first turn after `warmup`
    untimed steps of its own)."""
    taken, sync, steps = [[] for _ in loaders], barrier_sync(comm), [0]

    def step(which: int) -> None:
        _, x, y = loaders[which].get()
        steps[0] += 1
        step_fn(x, y, optimizer, 0.01, steps[0])

    for turn in range(rounds):
        for which in np.roll(np.arange(len(loaders)), turn):  # who goes first changes
            taken[which].append(time_steps(lambda i, w=which: step(w), chunk,
                                           warmup if turn == 0 else 0, sync=sync,
                                           samples_per_step=BATCH * comm.size))
    return [Timing(warmup, chunk, BATCH * comm.size, [t.seconds[0] for t in got],
                   [t.cpu_seconds[0] for t in got]) for got in taken]


def worker(data: str, rounds: int, chunk: int, warmup: int) -> None:
    """Train with the three loaders taking turns; rank 0 prints one JSON line: ranks, the page
    cache, a row per loader (with its harness timing) and the machine's facts."""
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from ..config import resolve
    from ..data.shards import describe
    from ..nn.models import ModelSpec, init_params
    from ..optim import make_optimizer
    from ..train.step import DataParallelStep
    from ..train.timeline import Timeline

    comm = MPI.COMM_WORLD
    info = describe(data)
    per_epoch = info.samples // comm.size // BATCH
    timeline = Timeline(True, comm.rank)
    loaders, shards, cache = open_loaders(comm, data, per_epoch, timeline)
    spec = ModelSpec("mlp", info.features, tuple(HIDDEN), int(info.num_classes))
    params = init_params(spec, 0, np, np.float32)
    step_fn = DataParallelStep(spec, params, comm, "auto", np, False, stall_timeout=0)
    optimizer = make_optimizer(resolve({"data": {"train": data},
                                        "optim": {"momentum": 0.9}}).optim)
    with threadpool_limits(limits=1):
        timings = take_turns(loaders, step_fn, optimizer, comm, rounds, chunk, warmup)
    waits = np.array([loader.wait_seconds for loader in loaders])
    for loader in loaders:
        loader.close()
    for shard in shards:
        shard.close()
    step_fn.close()
    reads, nbytes, read_s = timeline.read_count, timeline.read_bytes, timeline.read_seconds
    seconds = np.array([sum(t.seconds) * chunk for t in timings])
    cpu = np.array([sum(t.cpu_seconds) * chunk for t in timings])  # all threads of this rank
    comm.Allreduce(MPI.IN_PLACE, seconds, op=MPI.MAX)  # the slowest rank sets the pace
    comm.Allreduce(MPI.IN_PLACE, waits, op=MPI.MAX)
    comm.Allreduce(MPI.IN_PLACE, cpu, op=MPI.MAX)
    if comm.rank == 0:
        samples = rounds * chunk * BATCH * comm.size
        rows = [{"loader": name, "samples_per_s": samples / s, "data_wait_s": float(wait),
                 "cpu_ms_per_step": c / (rounds * chunk) * 1e3, "read_kib": None,
                 "read_mb_s": None, "timing": timing.to_dict()}
                for name, s, wait, c, timing in zip(LOADERS, seconds, waits, cpu, timings)]
        if read_s:
            rows[2].update(read_kib=nbytes / max(1, reads) / 1024,
                           read_mb_s=nbytes / read_s / 1e6)
        print(json.dumps({"ranks": comm.size, "page_cache": cache, "rows": rows,
                          "machine": machine_facts()}), flush=True)


COLUMNS = [
    Column("ranks", 5, lambda r: str(r["ranks"])),
    Column("loader", 20, lambda r: r["loader"], "<"),
    Column("samples/s", 10, lambda r: f"{r['samples_per_s']:,.0f}"),
    Column("data wait s", 11, lambda r: f"{r['data_wait_s']:.3f}"),
    Column("CPU ms/step", 11, lambda r: f"{r['cpu_ms_per_step']:.2f}"),
    Column("read KiB", 8, lambda r: "-" if r["read_kib"] is None else f"{r['read_kib']:,.0f}"),
    Column("read MB/s", 9, lambda r: "-" if r["read_mb_s"] is None else f"{r['read_mb_s']:,.0f}"),
    Column(" page cache", 0, lambda r: f" {r['page_cache']}", "<"),
]


def launch(ranks: int, data: str, args, env: dict) -> dict:
    """Run the worker on `ranks` ranks under mpiexec; return rank 0's JSON line."""
    cmd = [*mpiexec_command(ranks), sys.executable, "-m", "mpifed.benchmarks.streaming",
           "--worker", data, "--rounds", str(args.rounds), "--chunk", str(args.chunk),
           "--warmup", str(args.warmup)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"streaming on {ranks} ranks failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def record(got: dict, row: dict, args) -> Record:
    """The harness record of one loader on one rank count."""
    config = {"model": "mlp 784-512-256-10", "batch_per_rank": BATCH, "samples": args.samples,
              "dtype": "float32", "blas_threads": 1, "loader": row["loader"],
              "rounds": args.rounds, "chunk": args.chunk, "page_cache": got["page_cache"]}
    metrics = {k: row[k] for k in ("data_wait_s", "cpu_ms_per_step", "read_kib", "read_mb_s")}
    return Record.build("streaming", "mpifed", row["loader"], got["ranks"], config,
                        [Timing.from_dict(row["timing"])], metrics, got["machine"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench streaming", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=8, help="turns of each loader")
    parser.add_argument("--chunk", type=int, default=25, help="steps per turn")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"untimed steps before each loader's first turn (default {WARMUP})")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=None, help="where the data file goes (default: tmp)")
    parser.add_argument("--warm", action="store_true",
                        help="keep the page cache (the file read once before), to separate the "
                             "cost of disk reads from the loaders' own")
    parser.add_argument("--records", metavar="PATH",
                        help="append one harness record per loader and rank count (JSON Lines)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counts(args.chunk, args.warmup, args.rounds)
    if args.worker:
        worker(args.worker, args.rounds, args.chunk, args.warmup)
        return 0
    from ..data.synth import write_synthetic

    records = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data = os.path.join(tmp, "synth.h5")
        write_synthetic(data, args.samples, 784, 10, seed=0)
        print_table(COLUMNS, [], f"MLP 784-512-256-10, batch {BATCH}/rank, {args.rounds} turns "
                    f"of {args.chunk} steps per loader, {args.samples:,} x 784 float32 "
                    f"({os.path.getsize(data) / 2**20:,.0f} MiB, 1 MiB chunks)")
        env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
        if args.warm:
            env["BENCH_WARM"] = "1"
        for ranks in args.ranks:
            got = launch(ranks, data, args, env)
            for row in got["rows"]:
                print(format_row(COLUMNS, dict(row, ranks=ranks, page_cache=got["page_cache"])))
                records.append(record(got, row, args))
            rates = [row["samples_per_s"] for row in got["rows"]]
            print(f"# {ranks} rank(s): streamed+shuffled / in-memory shuffled = "
                  f"{rates[2] / rates[0]:.2f}x", flush=True)
    if args.records:
        append_records(args.records, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
