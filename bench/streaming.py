"""Streamed and shuffled against in-memory shuffled training: `python bench/streaming.py [--help]`.

MLP 784-512-256-10 (float32), batch 128 per rank, SGD with momentum, one BLAS thread per rank, on
a file written by `mpifed data synth` (200,000 x 784 by default, ~1 MiB chunks). For 1 and 2
ranks, in the same run: the shard held in memory and shuffled (a full permutation), the shard
streamed from the file (MPIFED_SHARD_MEMORY_BYTES, 1 byte by default as in issue 16) in order,
and streamed in block-shuffled order. Before each run the page cache is dropped (`sync; echo 1 >
/proc/sys/vm/drop_caches`) where this process may (root), else the data file alone leaves it
(posix_fadvise DONTNEED); every row, in memory too, so that all start with the same cold
libraries (a drop before the streamed runs only would charge them for it). Prints samples/s,
the summary's data_wait_seconds, the mean block read size and rate from the timeline, and the
ratio of streamed-shuffled to in-memory-shuffled samples/s.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CONFIG = """
[data]
train = "{data}"
shuffle = {shuffle}
[model]
kind = "mlp"
hidden = [512, 256]
[optim]
lr = 0.01
momentum = 0.9
batch_size = 128
steps = {steps}
[run]
out = "{out}"
progress = "none"
log_every = 0
timeline = true
"""


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


def run(ranks: int, data: str, shuffle: bool, memory: int | None, steps: int, tmp: str) -> dict:
    """Train once under mpiexec; return the summary plus read bytes and rate from the timeline."""
    out = tempfile.mkdtemp(dir=tmp)
    config = os.path.join(out, "run.toml")
    Path(config).write_text(CONFIG.format(data=data, shuffle=str(shuffle).lower(), steps=steps,
                                          out=out))
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
    env.pop("MPIFED_SHARD_MEMORY_BYTES", None)
    if memory is not None:
        env["MPIFED_SHARD_MEMORY_BYTES"] = str(memory)
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    subprocess.run([mpiexec, "-n", str(ranks), sys.executable, "-m", "mpifed", "train", config],
                   check=True, capture_output=True, env=env)
    summary = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
    trace = json.loads(Path(out, "timeline.json").read_text())["traceEvents"]
    reads = [e for e in trace if e["name"] == "read"]
    nbytes = sum(e["args"]["bytes"] for e in reads)
    seconds = sum(e["dur"] for e in reads) / 1e6
    summary["read_bytes"] = nbytes / max(1, len(reads))
    summary["read_mb_s"] = nbytes / seconds / 1e6 if seconds else float("nan")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=600, help="steps per run (batch 128/rank)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--memory-bytes", type=int, default=1,
                        help="MPIFED_SHARD_MEMORY_BYTES of the streamed runs (default 1)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each row, interleaved; the fastest is shown (busy machines)")
    parser.add_argument("--dir", default=None, help="where the data file goes (default: tmp)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        data = os.path.join(tmp, "synth.h5")
        subprocess.run([sys.executable, "-m", "mpifed", "data", "synth", data, "--samples",
                        str(args.samples), "--features", "784", "--classes", "10"], check=True,
                       capture_output=True)
        print(f"# MLP 784-512-256-10, batch 128/rank, {args.steps} steps, {args.samples:,} x 784 "
              f"float32 ({os.path.getsize(data) / 2**20:,.0f} MiB), streamed with "
              f"MPIFED_SHARD_MEMORY_BYTES={args.memory_bytes}")
        print(f"# {'ranks':>5} {'shard':<9} {'shuffle':<7} {'samples/s':>10} {'data wait s':>11} "
              f"{'read KiB':>9} {'read MB/s':>9}  cache")
        rows = (("in memory", True), ("streamed", False), ("streamed", True))
        for ranks in args.ranks:
            best, rates = {}, {}
            for _, (shard, shuffle) in itertools.product(range(args.repeat), rows):
                memory = args.memory_bytes if shard == "streamed" else None
                cache = drop_page_cache(data)  # before every run: all start equally cold
                s = run(ranks, data, shuffle, memory, args.steps, tmp)
                if s["samples_per_s"] > best.get((shard, shuffle), ({}, ""))[0].get(
                        "samples_per_s", 0):
                    best[shard, shuffle] = s, cache
            for shard, shuffle in rows:
                s, cache = best[shard, shuffle]
                rates[shard, shuffle] = s["samples_per_s"]
                read = (f"{s['read_bytes'] / 1024:>9,.0f} {s['read_mb_s']:>9,.0f}"
                        if np.isfinite(s["read_mb_s"]) else f"{'-':>9} {'-':>9}")
                print(f"  {ranks:>5} {shard:<9} {str(shuffle).lower():<7} "
                      f"{s['samples_per_s']:>10,.0f} {s['data_wait_seconds']:>11.3f} {read}  "
                      f"{cache}", flush=True)
            ratio = rates["streamed", True] / rates["in memory", True]
            print(f"# {ranks} rank(s): streamed+shuffled / in-memory shuffled = {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
