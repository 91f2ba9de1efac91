"""Compression end to end over a slow link: samples/s of the 46M-parameter MLP with
comm.compression none, fp16 and powersgd on 2 emulated nodes x 1 rank joined by a 1 Gbit/s link.

    python bench/compression_link.py [--rate 1gbit] [--nodes 2] [--batch 32] [--steps 5]
    mpifed bench compression [...] [--records runs.jsonl]         (the same)

The link: each launch runs in a network namespace of its own whose loopback is shaped by tc's
token bucket (mpifed/shaped_link.py; root, unshare and tc needed; --rate none: unshaped), and
MPICH splits the ranks into --nodes nodes, TCP over that loopback between them. The model: the
MLP 2048-4096-4096-4096-1024-10 of `mpifed bench memory` (46,160,906 parameters, float32, a
184.6 MB gradient), SGD with momentum on synthetic batches, `mpifed train`'s data-parallel step
(mpifed/train/step.py) with comm.allreduce = --allreduce (default ring: "auto" would first time
each algorithm on 185 MB buffers over the slow link).

Each repeat is one launch that runs every scheme in turn (the order rotates between repeats),
timed by the one harness (harness.time_steps): --warmup untimed steps, then --steps steps
between two barriers. PowerSGD's comm.compression_start is 1: the first warm-up step is exact,
the others are compressed, as every timed step is (the first compressed step is the slowest: it
touches the error buffers' 185 MB for the first time). The table gives each scheme's median over the
repeats of samples/s, the share of a step spent in communication, the bytes a rank sent per
step and the ratio to "none" (each repeat's ratio is taken inside one launch, side by side; the
median ratio is shown). `CPU s` is rank 0's CPU time per step (harness.Timing.cpu_seconds): far
below `step s` on a busy machine, the ranks wait for a core rather than for the link.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from types import SimpleNamespace

from ..launch import emulated_nodes_env, mpiexec_command
from ..shaped_link import RATE, probe, shaped_command
from .harness import (
    WARMUP,
    Column,
    Record,
    Timing,
    append_records,
    barrier_sync,
    check_counts,
    machine_facts,
    print_table,
    time_steps,
)
from .memory import SIZES, parse_sizes, sizes_text

SCHEMES = ("none", "fp16", "powersgd")
DEFAULT_WARMUP = 3  # each uncompressed step takes seconds over 1 Gbit/s: WARMUP (10) is minutes


def parameter_count(sizes: tuple) -> int:
    """Return the weights and biases of the MLP (features, hidden, classes)."""
    widths = (sizes[0], *sizes[1], sizes[2])
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def build_step(scheme: str, spec, comm, args):
    """Return `mpifed train`'s data-parallel step for `spec` exchanging with `scheme`."""
    import numpy as np

    from ..nn.models import init_params
    from ..train.step import make_step

    settings = SimpleNamespace(shard="none", allreduce=args.allreduce, overlap=False,
                               stall_timeout=0, compression=scheme, predivide=True,
                               powersgd_rank=args.powersgd_rank, compression_start=min(1, args.warmup),
                               powersgd_min_rate=2.0)
    return make_step(spec, init_params(spec, 0, np, "float32"), comm, settings, np, np.float32)


def time_scheme(scheme: str, spec, x, y, comm, args) -> dict:
    """Time `args.steps` steps of `scheme` after `args.warmup`; return this rank's figures."""
    from ..optim import SGD

    step_fn, optimizer = build_step(scheme, spec, comm, args), SGD(momentum=0.9)
    sent = []  # the compressor's running byte count at each end of the timed span

    def comm_seconds() -> float:
        sent.append(step_fn.compressor.bytes_sent() if step_fn.compressor else 0)
        return step_fn.comm_seconds

    timing = time_steps(lambda i: step_fn(x, y, optimizer, 0.01, i + 1), args.steps,
                        args.warmup, sync=barrier_sync(comm),
                        samples_per_step=args.batch * comm.size, probe=comm_seconds)
    step_fn.close()
    return {"scheme": scheme, "timing": timing.to_dict(),
            "bytes_per_step": (sent[-1] - sent[0]) / args.steps}


def worker(args) -> None:
    """Run every scheme in turn (starting at --first) on COMM_WORLD; rank 0 prints one JSON
    line: {scheme: figures} and the machine's facts."""
    import numpy as np
    from mpi4py import MPI

    from ..nn.models import ModelSpec

    comm = MPI.COMM_WORLD
    spec = ModelSpec("mlp", args.sizes[0], args.sizes[1], args.sizes[2])
    spec.seed = 0
    rng = np.random.default_rng(comm.rank)
    x = rng.standard_normal((args.batch, args.sizes[0])).astype(np.float32)  # (B, features)
    y = rng.integers(0, args.sizes[2], args.batch)  # (B,)
    order = args.schemes[args.first:] + args.schemes[:args.first]
    got = {scheme: time_scheme(scheme, spec, x, y, comm, args) for scheme in order}
    if comm.rank == 0:
        print(json.dumps({"schemes": got, "ranks": comm.size, "machine": machine_facts()}),
              flush=True)


def worker_command(args, first: int) -> list[str]:
    """Return the shaped mpiexec command of one repeat (schemes starting at index `first`)."""
    ranks = args.nodes * args.per_node
    command = [*mpiexec_command(ranks), sys.executable, "-m",
               "mpifed.benchmarks.compression_link", "--worker", "--first", str(first),
               "--schemes", *args.schemes, "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--batch", str(args.batch), "--sizes", sizes_text(args.sizes),
               "--powersgd-rank", str(args.powersgd_rank), "--allreduce", args.allreduce]
    return command if args.rate == "none" else shaped_command(command, args.rate)


def launch(args, first: int) -> dict | None:
    """Run one repeat; return rank 0's JSON line, or None after printing stderr's tail."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MPIFED_BLAS_THREADS="1", **emulated_nodes_env(args.nodes))
    done = subprocess.run(worker_command(args, first), capture_output=True, text=True, env=env,
                          timeout=3600)
    if done.returncode:
        print(f"# repeat {first} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarise(runs: list[dict], schemes: list[str]) -> list[dict]:
    """Return one row per scheme: medians over the repeats, the ratio to the first scheme
    taken inside each repeat. Pure."""
    rows = []
    for scheme in schemes:
        timings = [Timing.from_dict(r["schemes"][scheme]["timing"]) for r in runs]
        rates = [t.samples_per_second for t in timings]
        ratios = [t.samples_per_second / Timing.from_dict(
            r["schemes"][schemes[0]]["timing"]).samples_per_second for t, r in zip(timings, runs)]
        rows.append({"scheme": scheme, "samples_per_s": statistics.median(rates),
                     "step_s": statistics.median(t.median for t in timings),
                     "cpu_s": statistics.median(statistics.median(t.cpu_seconds)
                                                for t in timings),
                     "comm_fraction": statistics.median(t.probe[0] / t.seconds[0]
                                                        for t in timings),
                     "bytes_per_step": statistics.median(r["schemes"][scheme]["bytes_per_step"]
                                                         for r in runs),
                     "ratio": statistics.median(ratios), "ratios": ratios})
    return rows


COLUMNS = [
    Column("compression", 11, lambda r: r["scheme"], "<"),
    Column("samples/s", 9, lambda r: f"{r['samples_per_s']:.1f}"),
    Column("step s", 7, lambda r: f"{r['step_s']:.3f}"),
    Column("CPU s", 6, lambda r: f"{r['cpu_s']:.2f}"),
    Column("comm %", 6, lambda r: f"{100 * r['comm_fraction']:.0f}"),
    Column("MB sent/step", 12, lambda r: f"{r['bytes_per_step'] / 1e6:.2f}"),
    Column("vs none", 7, lambda r: f"{r['ratio']:.2f}x"),
    Column("each repeat", 20, lambda r: " ".join(f"{v:.2f}" for v in r["ratios"]), "<"),
]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench compression", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default=RATE,
                        help=f"the link between nodes, tc units (default {RATE}); none: unshaped")
    parser.add_argument("--nodes", type=int, default=2, help="emulated nodes (default 2)")
    parser.add_argument("--per-node", type=int, default=1, help="ranks per node (default 1)")
    parser.add_argument("--schemes", nargs="+", choices=["none", "fp16", "bf16", "powersgd"],
                        default=list(SCHEMES), help="the first is the baseline of the ratios")
    parser.add_argument("--powersgd-rank", type=int, default=2)
    parser.add_argument("--allreduce", choices=["ring", "auto"], default="ring")
    parser.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per scheme and repeat")
    parser.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                        help=f"untimed steps first, every scheme alike (default "
                             f"{DEFAULT_WARMUP}; the harness's usual is {WARMUP})")
    parser.add_argument("--repeats", type=int, default=3, help="launches; medians are shown")
    parser.add_argument("--sizes", type=parse_sizes, default=SIZES,
                        help="the MLP's widths IN,H1,...,OUT (default 2048,4096,4096,4096,1024,10)")
    parser.add_argument("--json", metavar="PATH", help="write the rows and every run as JSON")
    parser.add_argument("--records", metavar="PATH", help="append harness records (JSON Lines)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counts(args.steps, args.warmup, args.repeats)
    if args.worker:
        worker(args)
        return 0
    problem = None if args.rate == "none" else probe(args.rate)
    if problem:
        print(f"error: {problem} (or --rate none for the unshaped link)", file=sys.stderr)
        return 2
    runs = [got for first in range(args.repeats)
            if (got := launch(args, first % len(args.schemes))) is not None]
    if not runs:
        return 1
    rows = summarise(runs, args.schemes)
    print_table(COLUMNS, rows, f"MLP {sizes_text(args.sizes)} ({parameter_count(args.sizes):,} "
                f"parameters, float32), batch {args.batch}/rank, {args.nodes} nodes x "
                f"{args.per_node} rank(s), link {args.rate}, comm.allreduce {args.allreduce}, "
                f"powersgd rank {args.powersgd_rank}; medians of {len(runs)} launches")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"rows": rows, "runs": runs}, fh, indent=1)
    if args.records:
        append_records(args.records, [record(row, runs, args) for row in rows])
    return 0


def record(row: dict, runs: list[dict], args) -> Record:
    """The harness record of one scheme, its launches pooled."""
    config = {"model": f"MLP {sizes_text(args.sizes)}", "batch_per_rank": args.batch,
              "compression": row["scheme"], "link": args.rate, "nodes": args.nodes,
              "per_node": args.per_node, "allreduce": args.allreduce,
              "powersgd_rank": args.powersgd_rank}
    return Record.build("compression-link", "mpifed", row["scheme"], args.nodes * args.per_node,
                        config, [Timing.from_dict(r["schemes"][row["scheme"]]["timing"])
                                 for r in runs],
                        {"bytes_per_step": row["bytes_per_step"], "vs_none": row["ratio"]},
                        runs[0]["machine"])


if __name__ == "__main__":
    raise SystemExit(main())
