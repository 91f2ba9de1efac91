"""Training throughput: mpifed against PyTorch DDP (gloo, CPU) on the same model, data and batch.

    python bench/train_throughput.py [--ranks 1 2] [--steps 150] [--warmup 10] [--no-torch]
    mpifed bench throughput [...] [--records runs.jsonl]         (the same)

Model: the benchmark MLP 784-512-256-10 (mlp.py), float32, batch 128 per rank, SGD with momentum,
one BLAS thread per rank, data from the same HDF5 file (each rank its shard). Each implementation
runs under the same mpiexec in turn and is timed by the one harness (harness.py): --warmup steps,
then a barrier, then --steps timed steps ending in a barrier, for ours and torch alike. Ours is
`mpifed train`'s step (ours.py: batch, learning rate, gradient, all-reduce, update). The table
gives samples/s (best of the alternating repeats), the weak-scaling efficiency from 1 rank
(throughput_p / (p * throughput_1)), the share of a step in all-reduces, and the ratio ours /
torch measured in the same run. --records appends one JSON line per row (harness.Record).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..launch import mpiexec_command
from .harness import (
    WARMUP,
    Column,
    Record,
    Timing,
    append_records,
    check_counts,
    measure,
)
from .harness import print_table as table
from .mlp import CLASSES, FEATURES, NAME, model_section
from .ours import training_steps
from .peers import ddp_steps, join_torch_peers, rank_rows, torch_mlp

BATCH = 128


@contextmanager
def ours_steps(data: str, steps: int, out: str, comm, overlap: bool = False):
    """Yield the harness Steps of `mpifed train`'s step on this rank's shard.
    steps: every step the run takes (warm-up included; the schedule's length)."""
    from ..train.config import resolve

    cfg = resolve({
        "data": {"train": data, "shuffle": True},
        "model": model_section(),
        "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": BATCH, "steps": steps},
        "comm": {"allreduce": "auto", "overlap": overlap},
        "run": {"out": out, "log_every": 0, "progress": "none"},
    })
    with training_steps(cfg, comm) as got:
        yield got


@contextmanager
def torch_steps(data: str, steps: int, out: str, comm):
    """Yield the harness Steps of the same MLP in torch DDP over gloo; ranks come from MPI."""
    import torch

    torch.set_num_threads(1)
    join_torch_peers(comm, "gloo")
    x, y = rank_rows(data, comm)
    ddp = torch.nn.parallel.DistributedDataParallel(torch_mlp())
    with ddp_steps(ddp, x, y, BATCH, comm, gpu=False) as got:
        yield got


SIDES = {  # impl -> its Steps, as (data, steps, out, comm) -> context manager
    "ours": ours_steps,
    "ours-overlap": lambda data, steps, out, comm: ours_steps(data, steps, out, comm, True),
    "torch": torch_steps,
}


def run_worker(impl: str, data: str, steps: int, warmup: int, out: str) -> dict:
    """Time `impl` on the ranks of this launch with the harness: the same warm-up, timer and
    syncs for ours and the peer. Returns harness.measure's result (on every rank)."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    with SIDES[impl](data, warmup + steps, out, comm) as steps_of:
        return measure(steps_of, steps, warmup, BATCH * comm.size)


def worker_command(impl: str, ranks: int, data: str, steps: int, warmup: int,
                   out: str) -> list[str]:
    """Return the mpiexec command that runs one implementation; impls differ only in name."""
    return [*mpiexec_command(ranks), sys.executable,
            "-m", "mpifed.benchmarks.train_throughput", "--worker", impl, "--data", data,
            "--steps", str(steps), "--warmup", str(warmup), "--out", out]


def launch(impl: str, ranks: int, data: str, steps: int, warmup: int, out: str) -> dict:
    """Run one implementation on `ranks` ranks under mpiexec; return rank 0's JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MPIFED_BLAS_THREADS="1")
    done = subprocess.run(worker_command(impl, ranks, data, steps, warmup, out),
                          capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} on {ranks} ranks failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=150, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"steps before timing, ours and torch alike (default {WARMUP})")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; best is kept")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch DDP peer")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--records", metavar="PATH",
                        help="append one harness record per implementation and rank count "
                             "(JSON Lines)")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counts(args.steps, args.warmup, args.repeats)
    if args.worker:
        result = run_worker(args.worker, args.data, args.steps, args.warmup, args.out)
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            print(json.dumps(result), flush=True)
        return 0
    impls = ["ours", "ours-overlap"]
    if not args.no_torch:
        try:
            import torch  # noqa: F401

            impls.append("torch")
        except ImportError:
            print("# torch not installed: the DDP peer is skipped "
                  "(pip install torch==2.13.0 to compare)")
    from ..data.synth import write_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.h5")
        write_synthetic(data, args.samples, FEATURES, CLASSES, seed=0)
        runs: dict = {}
        for _ in range(args.repeats):
            for ranks in args.ranks:
                for impl in impls:
                    got = launch(impl, ranks, data, args.steps, args.warmup,
                                 os.path.join(tmp, "out"))
                    runs.setdefault((impl, ranks), []).append(got)
    best = {key: max(got, key=lambda g: g["samples_per_s"]) for key, got in runs.items()}
    print_table(best, impls, args.ranks)
    if args.json:
        rows = [{"impl": i, "ranks": r, "samples_per_s": best[(i, r)]["samples_per_s"],
                 "comm_fraction": best[(i, r)]["comm_fraction"]} for i, r in best]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.records:
        append_records(args.records, [record(impl, ranks, got, args)
                                      for (impl, ranks), got in runs.items()])
    return 0


def record(impl: str, ranks: int, runs: list[dict], args) -> Record:
    """The harness record of one implementation on `ranks` ranks, its launches pooled."""
    best = max(runs, key=lambda g: g["samples_per_s"])
    config = {"model": NAME, "batch_per_rank": BATCH, "samples": args.samples,
              "dtype": "float32", "blas_threads": 1, "overlap": impl == "ours-overlap",
              "allreduce": "gloo" if impl == "torch" else "auto"}
    return Record.build("throughput", "torch-ddp" if impl == "torch" else "mpifed", impl, ranks,
                        config, [Timing.from_dict(g["timing"]) for g in runs],
                        {"comm_fraction": best["comm_fraction"]}, best["machine"])


def print_table(best: dict, impls: list[str], ranks_list: list[int]) -> None:
    """Print the best run of each implementation and rank count (harness.print_table)."""
    rows = []
    for ranks in ranks_list:
        for impl in impls:
            row = dict(best[(impl, ranks)], impl=impl, ranks=ranks)
            row["base"] = best[(impl, ranks_list[0])]["samples_per_s"] * ranks / ranks_list[0]
            peer = best.get(("torch", ranks))
            row["ratio"] = (row["samples_per_s"] / peer["samples_per_s"]
                            if peer and impl.startswith("ours") else None)
            rows.append(row)
    table(COLUMNS, rows, f"{NAME}, batch {BATCH}/rank, float32, 1 BLAS thread per rank "
          "(best of the repeats)")


COLUMNS = [
    Column("impl", 12, lambda r: r["impl"], "<"),
    Column("ranks", 5, lambda r: str(r["ranks"])),
    Column("samples/s", 10, lambda r: f"{r['samples_per_s']:,.0f}"),
    Column("weak eff.", 9, lambda r: f"{100 * r['samples_per_s'] / r['base']:.1f}%"),
    Column("comm %", 7, lambda r: "" if r["comm_fraction"] is None
           else f"{100 * r['comm_fraction']:.1f}"),
    Column("ours/torch", 10, lambda r: "" if r["ratio"] is None else f"{r['ratio']:.2f}x"),
]


if __name__ == "__main__":
    raise SystemExit(main())
