"""Memory and step time per ZeRO stage (not a timed test): `python bench/memory.py [--help]`.

Launches `mpiexec -n p` once per (ranks, stage) so that each peak RSS is its own: an MLP of about
46 M parameters (2048 -> 4096 -> 4096 -> 4096 -> 1024 -> 10, float32) with Adam, synthetic
batches. Prints per rank: param/grad/optimizer-state bytes, optimizer state against 1/p of the
unsharded state, peak RSS (the largest over --repeat runs), and the median step time with its
ratio to shard="none" at the same rank count (with --repeat R: the stages run R times,
interleaved, and the median run counts; the range follows). Goals on 2 ranks: <= 1.05x for
optimizer and gradients, <= 1.5x for parameters.

`--interleaved`: step times only, the four stages built side by side in one mpiexec per rank
count and stepped in turn (none, optimizer, gradients, parameters, none, ...), so that a busy
spell on a shared machine hits all of them alike; medians over `--steps` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

SIZES = (2048, (4096, 4096, 4096, 1024), 10)
STAGES = ("none", "optimizer", "gradients", "parameters")


def worker(stage: str, steps: int, batch: int, overlap: bool) -> None:
    """Train `steps` steps at `stage` on COMM_WORLD; rank 0 prints one JSON line."""
    import numpy as np
    from mpi4py import MPI

    from mpifed.nn.models import ModelSpec, init_params
    from mpifed.optim import Adam
    from mpifed.train.data_parallel import peak_rss_bytes, state_bytes
    from mpifed.train.step import make_step

    comm = MPI.COMM_WORLD
    spec = ModelSpec("mlp", SIZES[0], SIZES[1], SIZES[2])
    spec.seed = 0
    # ZeRO-3 draws only its chunk: the whole model is never on any rank
    params = None if stage == "parameters" else init_params(spec, 0, np, "float32")
    settings = SimpleNamespace(shard=stage, allreduce="auto", overlap=overlap, stall_timeout=0)
    step_fn = make_step(spec, params, comm, settings, np, np.float32)
    del params
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[2], batch)
    optimizer, times = Adam(), []
    for i in range(steps):
        comm.Barrier()
        start = time.perf_counter()
        step_fn(x, y, optimizer, 1e-4, i + 1)
        times.append(time.perf_counter() - start)
    step_fn.close()
    row = dict(step_fn.memory_bytes(), optimizer_state_bytes=state_bytes(optimizer),
               peak_rss_bytes=peak_rss_bytes(), step_s=float(np.median(times[1:] or times)),
               n=spec.layout("float32").size,
               widest=max(b - a for a, b in (spec.layer_range(i, "float32")
                                             for i in range(len(spec.layers)))))
    rows = comm.gather(row)
    if comm.rank == 0:
        print(json.dumps({"stage": stage, "ranks": comm.size, "rows": rows}), flush=True)


def interleaved(steps: int, batch: int, overlap: bool) -> None:
    """Step every stage in turn on COMM_WORLD; rank 0 prints one JSON line of step times."""
    import numpy as np
    from mpi4py import MPI

    from mpifed.nn.models import ModelSpec, init_params
    from mpifed.optim import Adam
    from mpifed.train.step import make_step

    comm = MPI.COMM_WORLD
    spec = ModelSpec("mlp", SIZES[0], SIZES[1], SIZES[2])
    spec.seed = 0
    runs = {}
    for stage in STAGES:
        params = None if stage == "parameters" else init_params(spec, 0, np, "float32")
        settings = SimpleNamespace(shard=stage, allreduce="auto", overlap=overlap,
                                   stall_timeout=0)
        runs[stage] = (make_step(spec, params, comm, settings, np, np.float32), Adam())
        del params
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((batch, SIZES[0])).astype(np.float32)
    y = rng.integers(0, SIZES[2], batch)
    times = {stage: [] for stage in STAGES}
    for i in range(steps + 1):  # the first round is not timed
        for stage, (step_fn, optimizer) in runs.items():
            comm.Barrier()
            start = time.perf_counter()
            step_fn(x, y, optimizer, 1e-4, i + 1)
            took = comm.allreduce(time.perf_counter() - start, op=MPI.MAX)
            times[stage] += [took] if i else []
    for step_fn, _ in runs.values():
        step_fn.close()
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "times": times}), flush=True)


def run_worker(args, mpiexec: str, env: dict, ranks: int, worker: str) -> dict | None:
    """Run this script's `worker` on `ranks` ranks; return rank 0's JSON line, or None after
    printing the tail of stderr when the run failed."""
    cmd = [mpiexec, "-n", str(ranks), sys.executable, __file__, "--worker", worker,
           "--steps", str(args.steps), "--batch", str(args.batch)]
    cmd += ["--overlap"] if args.overlap else []
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        print(done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_interleaved(args, mpiexec: str, env: dict) -> int:
    """Run `interleaved` per rank count; print each stage's median step and ratio to none."""
    import statistics

    print(f"{'p':>2} {'stage':<10} {'median step s':>13} {'vs none':>7} {'range s':>16}")
    for ranks in [int(r) for r in args.ranks.split(",")]:
        got = run_worker(args, mpiexec, env, ranks, "interleaved")
        if got is None:
            return 1
        times = got["times"]
        base = statistics.median(times["none"])
        for stage in STAGES:
            median = statistics.median(times[stage])
            print(f"{ranks:>2} {stage:<10} {median:13.3f} {median / base:7.2f} "
                  f"{min(times[stage]):7.3f} .. {max(times[stage]):.3f}", flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="1,2,4", help="rank counts (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (first not timed)")
    parser.add_argument("--batch", type=int, default=32, help="rows per rank and step")
    parser.add_argument("--overlap", action="store_true", help="comm.overlap on")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per stage, interleaved; step time: the median run's")
    parser.add_argument("--interleaved", action="store_true",
                        help="step times only: all stages in one process, stepped in turn")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "interleaved":
        interleaved(args.steps, args.batch, args.overlap)
        return 0
    if args.worker:
        worker(args.worker, args.steps, args.batch, args.overlap)
        return 0
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
    if args.interleaved:
        return print_interleaved(args, mpiexec, env)
    print(f"{'p':>2} {'stage':<10} {'param MiB':>9} {'grad MiB':>8} {'optim MiB':>9} "
          f"{'vs 1/p':>6} {'peak RSS MiB':>12} {'goal MiB':>8} {'step s':>7} {'vs none':>7}")
    for ranks in [int(r) for r in args.ranks.split(",")]:
        base, runs = None, {stage: [] for stage in STAGES}
        for _ in range(args.repeat):  # stages interleaved: a busy spell hits them all alike
            for stage in STAGES:
                got = run_worker(args, mpiexec, env, ranks, stage)
                if got is None:
                    return 1
                runs[stage].append(got["rows"])
        for stage in STAGES:
            rows = max(runs[stage], key=lambda rs: max(r["peak_rss_bytes"] for r in rs))
            steps = sorted(max(r["step_s"] for r in rs) for rs in runs[stage])
            n, mib = rows[0]["n"], 1 / 2 ** 20
            whole_state = 2 * 4 * n  # Adam: m and v in float32
            worst = max(rows, key=lambda r: r["peak_rss_bytes"])
            # ZeRO-3's goal: (params + grads + Adam state)/p + the largest layer's working set
            # (two gather buffers and two gradient buckets) + 100 MiB
            goal = (16 * n / ranks + 4 * 4 * rows[0]["widest"]) * mib + 100
            step = steps[len(steps) // 2]  # the median run's (slowest rank's median step)
            base = step if stage == "none" else base
            print(f"{ranks:>2} {stage:<10} {worst['param_bytes'] * mib:9.1f} "
                  f"{worst['grad_bytes'] * mib:8.1f} "
                  f"{max(r['optimizer_state_bytes'] for r in rows) * mib:9.1f} "
                  f"{max(r['optimizer_state_bytes'] for r in rows) / (whole_state / ranks):6.3f} "
                  f"{worst['peak_rss_bytes'] * mib:12.1f} "
                  f"{goal if stage == 'parameters' else float('nan'):8.1f} "
                  f"{step:7.3f} {step / base:7.2f}"
                  + (f"  [{steps[0]:.3f} .. {steps[-1]:.3f}]" if len(steps) > 1 else ""),
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
