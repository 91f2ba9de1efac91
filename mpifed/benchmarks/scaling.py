"""One point of a scaling sweep: training throughput on the ranks of this launch, as a CSV row.

    srun -n 4 mpifed bench scaling --mode weak --data bench.h5 --csv scaling.csv

weak: a fixed batch per rank (the global batch grows with the ranks); strong: a fixed global
batch split over the ranks. The row gives samples/s, seconds per step, the shares of a step spent
computing, waiting for data and in the all-reduce, and the efficiency against the 1-rank row of
the same mode already in the CSV: throughput_p / (p * throughput_1) for weak scaling (ideal 1),
and the same for strong scaling, where the speed-up is throughput_p / throughput_1.
jobs/scaling.sbatch runs it for 1, 2, 4, ... ranks of an allocation.
"""

from __future__ import annotations

import argparse
import csv
import os

from mpi4py import MPI

from .mlp import FEATURES, HIDDEN, model_section

FIELDS = ["ranks", "nodes", "mode", "batch_per_rank", "global_batch", "samples_per_s",
          "step_seconds", "compute_fraction", "data_fraction", "comm_fraction", "efficiency"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench scaling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["weak", "strong"], default="weak")
    parser.add_argument("--batch", type=int, default=128,
                        help="weak: rows per rank; strong: global rows per step (default 128)")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--data", required=True,
                        help=f"HDF5 training file (mpifed data synth ... --features {FEATURES})")
    default_hidden = ",".join(map(str, HIDDEN))
    parser.add_argument("--hidden", default=default_hidden,
                        help=f"MLP hidden sizes (default {default_hidden}: the benchmark MLP)")
    parser.add_argument("--csv", required=True, help="CSV file to append the row to")
    parser.add_argument("--out", default=None, help="run folder (default: beside the CSV)")
    parser.add_argument("--algorithm", default="auto", help="comm.allreduce (default auto)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    per_rank = args.batch if args.mode == "weak" else max(1, args.batch // comm.size)
    from ..comm.topology import node_facts
    from ..train.config import resolve
    from ..train.loop import train

    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.csv)),
                                   f"scaling-run-{comm.size}")
    cfg = resolve({
        "data": {"train": args.data},
        "model": model_section(int(h) for h in args.hidden.split(",")),
        "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": per_rank, "steps": args.steps},
        "comm": {"allreduce": args.algorithm},
        "run": {"out": out, "log_every": 0, "progress": "none", "resume": "never"},
    })
    summary = train(cfg, comm)
    nodes = node_facts(comm)["nodes"]
    if comm.rank == 0:
        row = {"ranks": comm.size, "nodes": nodes, "mode": args.mode, "batch_per_rank": per_rank,
               "global_batch": per_rank * comm.size,
               "samples_per_s": round(summary["samples_per_s"], 1),
               "step_seconds": summary["seconds"] / args.steps,
               "data_fraction": summary["data_wait_seconds"] / summary["seconds"],
               "comm_fraction": summary["comm_seconds"] / summary["seconds"]}
        row["compute_fraction"] = 1 - row["data_fraction"] - row["comm_fraction"]
        row["efficiency"] = efficiency(args.csv, row)
        append_row(args.csv, row)
        print(",".join(str(row[f]) for f in FIELDS))
    return 0


def efficiency(path: str, row: dict) -> float | str:
    """Return throughput / (ranks * 1-rank throughput of the same mode), or '' without a base."""
    if row["ranks"] == 1:
        return 1.0
    if not os.path.exists(path):
        return ""
    with open(path) as fh:
        base = [r for r in csv.DictReader(fh) if r["mode"] == row["mode"] and r["ranks"] == "1"]
    if not base:
        return ""
    return round(row["samples_per_s"] / (row["ranks"] * float(base[-1]["samples_per_s"])), 4)


def append_row(path: str, row: dict) -> None:
    new = not os.path.exists(path)
    with open(path, "a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)
