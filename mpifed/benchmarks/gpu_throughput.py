"""GPU training throughput: mpifed on CuPy against PyTorch (CUDA) on the same MLP and batch.

    python bench/gpu_throughput.py [--ranks 1 2] [--steps 200] [--batch 128] [--no-peer]
    mpifed bench gpu [...] [--warmup 10] [--records runs.jsonl]     (the same)

Needs CuPy and a CUDA device (and torch with CUDA for the peer). The benchmark MLP
784-512-256-10 (mlp.py), float32,
SGD with momentum; ours: `mpifed train` with comm.backend = "cupy" (NCCL between the GPUs of a
node), the peer: torch DDP over NCCL. Prints samples/s and the ratio, measured in the same run.
Both are timed by the one harness (harness.py) alike: --warmup steps first (kernel
compilation, cuBLAS and NCCL set-up), then the timed steps between device synchronisations and
barriers. Rank counts above the GPU count are skipped: NCCL needs a GPU each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from contextlib import contextmanager

from ..launch import mpiexec_command
from .harness import (
    WARMUP,
    Column,
    Record,
    Timing,
    append_records,
    check_counts,
    format_row,
    measure,
)
from .harness import print_table as table
from .mlp import CLASSES, FEATURES, NAME, model_section
from .ours import training_steps
from .peers import ddp_steps, join_torch_peers, rank_rows, torch_mlp


@contextmanager
def ours_steps(data: str, steps: int, batch: int, out: str, comm):
    """Yield the harness Steps of `mpifed train`'s step on CuPy (NCCL between the GPUs).
    steps: every step the run takes (warm-up included)."""
    from ..train.config import resolve

    def config(n: int):
        return resolve({
            "data": {"train": data}, "model": model_section(),
            "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": batch, "steps": n},
            "comm": {"backend": "cupy",
                     "allreduce": "nccl" if comm.size > 1 else "auto"},
            "run": {"out": out, "log_every": 0, "progress": "none", "resume": "never"},
        })

    with training_steps(config(steps), comm) as got:
        yield got


@contextmanager
def torch_steps(data: str, steps: int, batch: int, out: str, comm):
    """Yield the harness Steps of the same MLP in torch DDP over NCCL; ranks come from MPI."""
    import torch
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    device = torch.device("cuda", node.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    join_torch_peers(comm, "nccl")
    x, y = rank_rows(data, comm, device)
    ddp = torch.nn.parallel.DistributedDataParallel(torch_mlp(device), device_ids=[device.index])
    with ddp_steps(ddp, x, y, batch, comm, gpu=True) as got:
        yield got


SIDES = {"ours": ours_steps, "torch": torch_steps}  # (data, steps, batch, out, comm) -> Steps


def run_worker(impl: str, data: str, steps: int, warmup: int, batch: int, out: str) -> dict:
    """Time `impl` on the ranks of this launch with the harness: the same warm-up (kernel
    compilation, cuBLAS and NCCL set-up), timer and syncs for ours and the peer."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    with SIDES[impl](data, warmup + steps, batch, out, comm) as steps_of:
        return measure(steps_of, steps, warmup, batch * comm.size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"steps before timing, ours and torch alike (default {WARMUP})")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-peer", action="store_true", help="time ours only (no torch)")
    parser.add_argument("--records", metavar="PATH",
                        help="append one harness record per implementation and rank count "
                             "(JSON Lines)")
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counts(args.steps, args.warmup)
    if args.worker:
        result = run_worker(args.worker, args.data, args.steps, args.warmup, args.batch,
                            args.out)
        from mpi4py import MPI

        if MPI.COMM_WORLD.rank == 0:
            print(json.dumps(result), flush=True)
        return 0
    import cupy

    gpus = cupy.cuda.runtime.getDeviceCount()
    impls = ("ours",) if args.no_peer else ("ours", "torch")
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "bench.h5")
        subprocess.run([sys.executable, "-m", "mpifed", "data", "synth", data, "--samples",
                        "65536", "--features", str(FEATURES), "--classes", str(CLASSES)],
                       check=True)
        print(f"# GPU: {NAME}, batch {args.batch}/rank, float32")
        table(COLUMNS, [])  # the header; each row prints as soon as it is measured
        records = []
        for ranks in args.ranks:
            if ranks > gpus:
                print(f"  {ranks:>5} skipped: {gpus} GPU(s), and NCCL needs one per rank")
                continue
            got = {}
            for impl in impls:
                cmd = [*mpiexec_command(ranks), sys.executable, "-m",
                       "mpifed.benchmarks.gpu_throughput", "--worker", impl,
                       "--data", data, "--steps", str(args.steps), "--warmup",
                       str(args.warmup), "--batch", str(args.batch),
                       "--out", os.path.join(tmp, "out")]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    print(f"# {impl} on {ranks} ranks failed:\n{done.stderr[-1500:]}")
                    return 1
                got[impl] = json.loads(done.stdout.strip().splitlines()[-1])
                records.append(record(impl, ranks, got[impl], args))
            print_row(ranks, got)
    if args.records:
        append_records(args.records, records)
    return 0


COLUMNS = [
    Column("ranks", 5, lambda r: str(r["ranks"])),
    Column("ours", 12, lambda r: f"{r['ours']:,.0f}"),
    Column("torch", 12, lambda r: "-" if r["torch"] is None else f"{r['torch']:,.0f}"),
    Column("ours/torch", 10, lambda r: "-" if r["torch"] is None
           else f"{r['ours'] / r['torch']:.2f}x"),
]


def print_row(ranks: int, got: dict) -> None:
    """Print one rank count's samples/s as it is measured (the header came first)."""
    peer = got.get("torch")
    row = {"ranks": ranks, "ours": got["ours"]["samples_per_s"],
           "torch": peer["samples_per_s"] if peer else None}
    print(format_row(COLUMNS, row), flush=True)


def record(impl: str, ranks: int, got: dict, args) -> Record:
    """The harness record of one implementation on `ranks` GPUs."""
    config = {"model": NAME, "batch_per_rank": args.batch, "dtype": "float32",
              "backend": "torch-cuda" if impl == "torch" else "cupy",
              "allreduce": "nccl" if ranks > 1 else "none"}
    return Record.build("gpu", "torch-ddp" if impl == "torch" else "mpifed", impl, ranks,
                        config, [Timing.from_dict(got["timing"])],
                        {"comm_fraction": got["comm_fraction"]}, got["machine"])


if __name__ == "__main__":
    raise SystemExit(main())
