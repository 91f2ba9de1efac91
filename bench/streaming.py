"""Streamed and shuffled against in-memory shuffled training: `python bench/streaming.py [--help]`.

MLP 784-512-256-10 (float32), batch 128 per rank, SGD with momentum, one BLAS thread per rank, on
a file written by `mpifed data synth` (200,000 x 784 by default, ~1 MiB chunks), for 1 and 2
ranks. Each rank count is one mpiexec run in which three loaders of the same rows take turns, a
stretch of --chunk steps each, round after round, on the same model and data-parallel step:

  in memory, shuffled     the shard held in memory, a full permutation per epoch
  streamed, in order      the shard read from the file per batch (MPIFED_SHARD_MEMORY_BYTES=1)
  streamed, shuffled      the same, in block-shuffled order (a reader thread, whole blocks)

Taking turns in one run exposes all three to the same load, which matters on a shared machine.
The page cache is dropped (`sync; echo 1 > /proc/sys/vm/drop_caches`) after the in-memory shard
is loaded and before the streamed ones open, where this process may (root); else the data file
alone leaves it (posix_fadvise DONTNEED). A run reads less than an epoch of each streamed shard,
so every streamed read comes from the disk. Prints samples/s per loader, the time steps waited
for data, the CPU time per step of the whole rank (all its threads; with 2 ranks it includes
MPI's busy waiting), the block read size and rate (from the timeline), and streamed-shuffled /
in-memory samples/s.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

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
    from mpifed.data.shards import Shard, describe, shard_bounds
    from mpifed.data.stream import Prefetcher, shard_stream

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


def worker(data: str, rounds: int, chunk: int) -> None:
    """Train with the three loaders taking turns; rank 0 prints one line per loader."""
    from mpi4py import MPI
    from threadpoolctl import threadpool_limits

    from mpifed.data.shards import describe
    from mpifed.nn.models import ModelSpec, init_params
    from mpifed.optim import make_optimizer
    from mpifed.train.config import resolve
    from mpifed.train.step import DataParallelStep
    from mpifed.train.timeline import Timeline

    comm = MPI.COMM_WORLD
    info = describe(data)
    per_epoch = info.samples // comm.size // BATCH
    timeline = Timeline(True, comm.rank)
    loaders, shards, cache = open_loaders(comm, data, per_epoch, timeline)
    spec = ModelSpec("mlp", info.features, tuple(HIDDEN), int(info.num_classes))
    params = init_params(spec, 0, np, np.float32)
    step_fn = DataParallelStep(spec, params, comm, "auto", np, False, stall_timeout=0)
    optimizer = make_optimizer(resolve({"data": {"train": data},
                                        "optim": {"momentum": 0.9}})["optim"])
    seconds, cpu, steps = np.zeros(3), np.zeros(3), 0
    with threadpool_limits(limits=1):
        for k in range(chunk):  # warm-up, untimed
            _, x, y = loaders[0].get()
            step_fn(x, y, optimizer, 0.01, k + 1)
        for turn in range(rounds):
            for which in np.roll(np.arange(3), turn):  # who goes first changes every round
                comm.Barrier()
                began, began_cpu = time.perf_counter(), time.process_time()
                for _ in range(chunk):
                    _, x, y = loaders[which].get()
                    step_fn(x, y, optimizer, 0.01, steps + 1)
                    steps += 1
                seconds[which] += time.perf_counter() - began
                cpu[which] += time.process_time() - began_cpu  # all threads of this rank
    waits = [loader.wait_seconds for loader in loaders]
    for loader in loaders:
        loader.close()
    for shard in shards:
        shard.close()
    step_fn.close()
    reads = [e for e in timeline.events if e["name"] == "read"]
    nbytes = sum(e["args"]["bytes"] for e in reads)
    read_s = sum(e["dur"] for e in reads) / 1e6
    waits = np.array(waits)
    comm.Allreduce(MPI.IN_PLACE, seconds, op=MPI.MAX)  # the slowest rank sets the pace
    comm.Allreduce(MPI.IN_PLACE, waits, op=MPI.MAX)
    comm.Allreduce(MPI.IN_PLACE, cpu, op=MPI.MAX)
    if comm.rank == 0:
        samples = rounds * chunk * BATCH * comm.size
        rates = samples / seconds
        cpu_ms = cpu / (rounds * chunk) * 1e3
        for name, rate, wait, ms in zip(LOADERS, rates, waits, cpu_ms):
            read = (f"{nbytes / max(1, len(reads)) / 1024:>8,.0f} {nbytes / read_s / 1e6:>9,.0f}"
                    if name == LOADERS[2] and read_s else f"{'-':>8} {'-':>9}")
            print(f"  {comm.size:>5} {name:<20} {rate:>10,.0f} {wait:>11.3f} {ms:>11.2f} {read}  "
                  f"{cache}")
        print(f"# {comm.size} rank(s): streamed+shuffled / in-memory shuffled = "
              f"{rates[2] / rates[0]:.2f}x", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=8, help="turns of each loader")
    parser.add_argument("--chunk", type=int, default=25, help="steps per turn")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dir", default=None, help="where the data file goes (default: tmp)")
    parser.add_argument("--warm", action="store_true",
                        help="keep the page cache (the file read once before), to separate the "
                             "cost of disk reads from the loaders' own")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.rounds, args.chunk)
        return 0
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data = os.path.join(tmp, "synth.h5")
        subprocess.run([sys.executable, "-m", "mpifed", "data", "synth", data, "--samples",
                        str(args.samples), "--features", "784", "--classes", "10"], check=True,
                       capture_output=True)
        print(f"# MLP 784-512-256-10, batch {BATCH}/rank, {args.rounds} turns of {args.chunk} "
              f"steps per loader, {args.samples:,} x 784 float32 "
              f"({os.path.getsize(data) / 2**20:,.0f} MiB, 1 MiB chunks)")
        print(f"# {'ranks':>5} {'loader':<20} {'samples/s':>10} {'data wait s':>11} "
              f"{'CPU ms/step':>11} {'read KiB':>8} {'read MB/s':>9}  page cache", flush=True)
        mpiexec = str(Path(sys.executable).with_name("mpiexec"))
        env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
        if args.warm:
            env["BENCH_WARM"] = "1"
        for ranks in args.ranks:
            subprocess.run([mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker",
                            data, "--rounds", str(args.rounds), "--chunk", str(args.chunk)],
                           check=True, env=env)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
