"""Memory and step time per ZeRO stage (not a timed test).

    python bench/memory.py [--ranks 1,2,4] [--steps 4] [--warmup 10] [--repeat 1] [--interleaved]
    mpifed bench memory [...] [--records runs.jsonl]         (the same)

Launches `mpiexec -n p` once per (ranks, stage) so that each peak RSS is its own: an MLP of about
46 M parameters (2048 -> 4096 -> 4096 -> 4096 -> 1024 -> 10, float32; --sizes changes it) with
Adam, synthetic batches. Prints per rank: param/grad/optimizer-state bytes, optimizer state
against 1/p of the unsharded state, peak RSS (the largest over --repeat runs), and the median
step time with its ratio to shard="none" at the same rank count (with --repeat R: the stages run
R times, interleaved, and the median run counts; the range follows). Goals on 2 ranks: <= 1.05x
for optimizer and gradients, <= 1.5x for parameters.

Steps are timed by the one harness (harness.py): --warmup untimed steps, then --steps steps, each
between two barriers, so a step's time is the slowest rank's; a run's step time is the median
step. --records appends one harness record per (ranks, stage) (JSON Lines), its launches pooled.

`--interleaved`: step times only, the four stages built side by side in one mpiexec per rank
count and stepped in turn (none, optimizer, gradients, parameters, none, ...), so that a busy
spell on a shared machine hits all of them alike; --warmup untimed rounds, then medians over
`--steps` rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from types import SimpleNamespace

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

SIZES = (2048, (4096, 4096, 4096, 1024), 10)
STAGES = ("none", "optimizer", "gradients", "parameters")
MIB = 1 / 2 ** 20


def parse_sizes(text: str) -> tuple:
    """Return (features, hidden, classes) of 'IN,H1,...,OUT' (at least IN,OUT)."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if len(widths) < 2 or min(widths) < 1:
        raise ValueError(f"memory: --sizes {text!r} is not IN,H1,...,OUT of positive widths; "
                         "e.g. --sizes 2048,4096,4096,4096,1024,10 (the default)")
    return widths[0], tuple(widths[1:-1]), widths[-1]


def sizes_text(sizes: tuple) -> str:
    """Return the --sizes form of (features, hidden, classes)."""
    return ",".join(str(w) for w in (sizes[0], *sizes[1], sizes[2]))


def build_step(stage: str, spec, comm, overlap: bool):
    """Return the data-parallel step of `stage` for `spec` on `comm`, as `mpifed train` builds
    it; ZeRO-3 draws only its chunk, so the whole model is never on any rank."""
    import numpy as np

    from ..nn.models import init_params
    from ..train.step import make_step

    params = None if stage == "parameters" else init_params(spec, 0, np, "float32")
    settings = SimpleNamespace(shard=stage, allreduce="auto", overlap=overlap, stall_timeout=0,
                               compression="none")
    return make_step(spec, params, comm, settings, np, np.float32)


def model_and_batch(sizes: tuple, batch: int, comm):
    """Return the spec of the MLP `sizes` and this rank's synthetic batch (x, y)."""
    import numpy as np

    from ..nn.models import ModelSpec

    spec = ModelSpec("mlp", sizes[0], sizes[1], sizes[2])
    spec.seed = 0
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((batch, sizes[0])).astype(np.float32)
    y = rng.integers(0, sizes[2], batch)
    return spec, x, y


def worker(stage: str, steps: int, warmup: int, batch: int, overlap: bool, sizes: tuple) -> None:
    """Train `warmup` + `steps` steps at `stage` on COMM_WORLD, timed by the harness; rank 0
    prints one JSON line: stage, ranks, every rank's row, the timing and the machine's facts."""
    from mpi4py import MPI

    from ..optim import Adam
    from ..train.data_parallel import peak_rss_bytes, state_bytes

    comm = MPI.COMM_WORLD
    spec, x, y = model_and_batch(sizes, batch, comm)
    step_fn, optimizer = build_step(stage, spec, comm, overlap), Adam()
    # one step per repeat: the median step, not the mean, is the run's step time
    timing = time_steps(lambda i: step_fn(x, y, optimizer, 1e-4, i + 1), 1, warmup,
                        repeats=steps, sync=barrier_sync(comm), samples_per_step=batch * comm.size)
    step_fn.close()
    row = dict(step_fn.memory_bytes(), optimizer_state_bytes=state_bytes(optimizer),
               peak_rss_bytes=peak_rss_bytes(), step_s=timing.median,
               n=spec.layout("float32").size,
               widest=max(b - a for a, b in (spec.layer_range(i, "float32")
                                             for i in range(len(spec.layers)))))
    rows = comm.gather(row)
    if comm.rank == 0:
        print(json.dumps({"stage": stage, "ranks": comm.size, "rows": rows,
                          "timing": timing.to_dict(), "machine": machine_facts()}), flush=True)


def interleaved(steps: int, warmup: int, batch: int, overlap: bool, sizes: tuple) -> None:
    """Step every stage in turn on COMM_WORLD, each step timed by the harness; rank 0 prints one
    JSON line: ranks, each stage's step times and timing, the machine's facts."""
    from mpi4py import MPI

    from ..optim import Adam

    comm = MPI.COMM_WORLD
    spec, x, y = model_and_batch(sizes, batch, comm)
    runs = {stage: (build_step(stage, spec, comm, overlap), Adam()) for stage in STAGES}
    sync, taken = barrier_sync(comm), {stage: [] for stage in STAGES}
    done = dict.fromkeys(STAGES, 0)  # each stage's steps so far: Adam's step number

    def step(stage: str) -> None:
        step_fn, optimizer = runs[stage]
        done[stage] += 1
        step_fn(x, y, optimizer, 1e-4, done[stage])

    for turn in range(steps):
        for stage in STAGES:
            # the first turn of each stage carries its warm-up: every stage warms up alike
            taken[stage].append(time_steps(lambda i, stage=stage: step(stage), 1,
                                           warmup if turn == 0 else 0, sync=sync,
                                           samples_per_step=batch * comm.size))
    for step_fn, _ in runs.values():
        step_fn.close()
    timings = {stage: pooled(got, warmup) for stage, got in taken.items()}
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size,
                          "times": {s: t.seconds for s, t in timings.items()},
                          "timings": {s: t.to_dict() for s, t in timings.items()},
                          "machine": machine_facts()}), flush=True)


def pooled(timings: list[Timing], warmup: int) -> Timing:
    """Return one Timing of single-step timings, one repeat each, taken after `warmup` steps."""
    return Timing(warmup, 1, timings[0].samples_per_step, [t.seconds[0] for t in timings],
                  [t.cpu_seconds[0] for t in timings])


def worker_command(args, ranks: int, worker: str) -> list[str]:
    """Return the mpiexec command that runs `worker` (a stage, or "interleaved")."""
    return [*mpiexec_command(ranks), sys.executable, "-m", "mpifed.benchmarks.memory",
            "--worker", worker, "--steps", str(args.steps), "--warmup", str(args.warmup),
            "--batch", str(args.batch), "--sizes", sizes_text(args.sizes),
            *(["--overlap"] if args.overlap else [])]


def run_worker(args, env: dict, ranks: int, worker: str) -> dict | None:
    """Run `worker` on `ranks` ranks; return rank 0's JSON line, or None after printing the
    tail of stderr when the run failed."""
    done = subprocess.run(worker_command(args, ranks, worker), capture_output=True, text=True,
                          env=env)
    if done.returncode:
        print(done.stderr[-2000:])
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


INTERLEAVED = [
    Column("p", 2, lambda r: str(r["ranks"])),
    Column("stage", 10, lambda r: r["stage"], "<"),
    Column("median step s", 13, lambda r: f"{r['median']:.3f}"),
    Column("vs none", 7, lambda r: f"{r['median'] / r['base']:.2f}"),
    Column("range s", 16, lambda r: f"{r['low']:7.3f} .. {r['high']:.3f}"),
]


def print_interleaved(args, env: dict) -> int:
    """Run `interleaved` per rank count; print each stage's median step and ratio to none."""
    print_table(INTERLEAVED, [])
    records = []
    for ranks in args.ranks:
        got = run_worker(args, env, ranks, "interleaved")
        if got is None:
            return 1
        times = got["times"]
        base = statistics.median(times["none"])
        for stage in STAGES:
            print(format_row(INTERLEAVED, {
                "ranks": ranks, "stage": stage, "median": statistics.median(times[stage]),
                "base": base, "low": min(times[stage]), "high": max(times[stage])}), flush=True)
            records.append(record(args, ranks, stage, [Timing.from_dict(got["timings"][stage])],
                                  {}, got["machine"], interleaved=True))
    if args.records:
        append_records(args.records, records)
    return 0


MEMORY = [
    Column("p", 2, lambda r: str(r["ranks"])),
    Column("stage", 10, lambda r: r["stage"], "<"),
    Column("param MiB", 9, lambda r: f"{r['param_bytes'] * MIB:.1f}"),
    Column("grad MiB", 8, lambda r: f"{r['grad_bytes'] * MIB:.1f}"),
    Column("optim MiB", 9, lambda r: f"{r['optimizer_state_bytes'] * MIB:.1f}"),
    Column("vs 1/p", 6, lambda r: f"{r['vs_1_over_p']:.3f}"),
    Column("peak RSS MiB", 12, lambda r: f"{r['peak_rss_bytes'] * MIB:.1f}"),
    Column("goal MiB", 8, lambda r: f"{r['goal_mib']:.1f}"),
    Column("step s", 7, lambda r: f"{r['step_s']:.3f}"),
    Column("vs none", 7, lambda r: f"{r['vs_none']:.2f}"),
]


def spread(row: dict) -> str:
    """Return what follows a row of MEMORY: the range of the step times over --repeat runs."""
    return f"  [{row['low']:.3f} .. {row['high']:.3f}]" if row["repeats"] > 1 else ""


def stage_row(ranks: int, stage: str, runs: list[list[dict]], base: float | None) -> dict:
    """Return the table row of one stage: the worst rank's bytes of the run with the largest
    peak RSS, the median run's step time (each run's slowest rank), the goal."""
    rows = max(runs, key=lambda rs: max(r["peak_rss_bytes"] for r in rs))
    steps = sorted(max(r["step_s"] for r in rs) for rs in runs)
    n = rows[0]["n"]
    whole_state = 2 * 4 * n  # Adam: m and v in float32
    worst = max(rows, key=lambda r: r["peak_rss_bytes"])
    # ZeRO-3's goal: (params + grads + Adam state)/p + the largest layer's working set
    # (two gather buffers and two gradient buckets) + 100 MiB
    goal = (16 * n / ranks + 4 * 4 * rows[0]["widest"]) * MIB + 100
    step = steps[len(steps) // 2]  # the median run's (slowest rank's median step)
    optim = max(r["optimizer_state_bytes"] for r in rows)
    return {"ranks": ranks, "stage": stage, "param_bytes": worst["param_bytes"],
            "grad_bytes": worst["grad_bytes"], "optimizer_state_bytes": optim,
            "vs_1_over_p": optim / (whole_state / ranks),
            "peak_rss_bytes": worst["peak_rss_bytes"],
            "goal_mib": goal if stage == "parameters" else float("nan"), "step_s": step,
            "vs_none": step / (step if base is None else base), "low": steps[0],
            "high": steps[-1], "repeats": len(steps)}


def record(args, ranks: int, stage: str, timings: list[Timing], metrics: dict,
           machine: dict, interleaved: bool = False) -> Record:
    """The harness record of one stage on `ranks` ranks, its launches pooled."""
    config = {"model": f"mlp {sizes_text(args.sizes)}", "dtype": "float32", "optimizer": "adam",
              "batch_per_rank": args.batch, "shard": stage, "allreduce": "auto",
              "overlap": args.overlap, "interleaved": interleaved}
    return Record.build("memory", "mpifed", stage, ranks, config, timings, metrics, machine)


def run_stages(args, env: dict) -> int:
    """Run every stage per rank count, --repeat times interleaved; print a row per stage."""
    print_table(MEMORY, [])
    records = []
    for ranks in args.ranks:
        base, runs = None, {stage: [] for stage in STAGES}
        for _ in range(args.repeat):  # stages interleaved: a busy spell hits them all alike
            for stage in STAGES:
                got = run_worker(args, env, ranks, stage)
                if got is None:
                    return 1
                runs[stage].append(got)
        for stage in STAGES:
            row = stage_row(ranks, stage, [got["rows"] for got in runs[stage]], base)
            base = row["step_s"] if stage == "none" else base
            print(format_row(MEMORY, row) + spread(row), flush=True)
            metrics = {k: row[k] for k in ("param_bytes", "grad_bytes", "optimizer_state_bytes",
                                            "peak_rss_bytes", "vs_1_over_p")}
            metrics["goal_mib"] = row["goal_mib"] if stage == "parameters" else None
            records.append(record(args, ranks, stage,
                                  [Timing.from_dict(got["timing"]) for got in runs[stage]],
                                  metrics, runs[stage][0]["machine"]))
    if args.records:
        append_records(args.records, records)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", default="1,2,4", help="rank counts (default 1,2,4)")
    parser.add_argument("--steps", type=int, default=4,
                        help="timed steps per run, after --warmup (default 4)")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"untimed steps before them, every stage alike (default {WARMUP})")
    parser.add_argument("--batch", type=int, default=32, help="rows per rank and step")
    parser.add_argument("--sizes", type=parse_sizes, default=SIZES, metavar="IN,H1,...,OUT",
                        help="the MLP's widths (default 2048,4096,4096,4096,1024,10)")
    parser.add_argument("--overlap", action="store_true", help="comm.overlap on")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per stage, interleaved; step time: the median run's")
    parser.add_argument("--interleaved", action="store_true",
                        help="step times only: all stages in one process, stepped in turn")
    parser.add_argument("--records", metavar="PATH",
                        help="append one harness record per rank count and stage (JSON Lines)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counts(args.steps, args.warmup, args.repeat)
    args.ranks = [int(r) for r in args.ranks.split(",")]
    if args.worker == "interleaved":
        interleaved(args.steps, args.warmup, args.batch, args.overlap, args.sizes)
        return 0
    if args.worker:
        worker(args.worker, args.steps, args.warmup, args.batch, args.overlap, args.sizes)
        return 0
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
    if args.interleaved:
        return print_interleaved(args, env)
    return run_stages(args, env)


if __name__ == "__main__":
    raise SystemExit(main())
