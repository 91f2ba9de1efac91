"""Training throughput: mpifed against PyTorch DDP (gloo, CPU) on the same model, data and batch.

    python bench/train_throughput.py [--ranks 1 2] [--steps 150] [--no-torch]
    mpifed bench throughput [...]                                (the same)

Model: the benchmark MLP 784-512-256-10 (mlp.py), float32, batch 128 per rank, SGD with momentum,
one BLAS thread per rank, data from the same HDF5 file (each rank its shard). Each implementation
runs under the same mpiexec in turn; the table gives samples/s, the weak-scaling efficiency from 1
rank (throughput_p / (p * throughput_1)) and the ratio ours / torch measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from ..launch import mpiexec_path
from .mlp import CLASSES, FEATURES, NAME, model_section
from .peers import join_torch_peers, rank_rows, timed_ddp_steps, torch_mlp

BATCH = 128


def worker_ours(data: str, steps: int, out: str, overlap: bool = False) -> dict:
    """Run `mpifed train` in-process on this rank's shard; return rank 0's summary."""
    from mpi4py import MPI

    from ..train.config import resolve
    from ..train.loop import train

    cfg = resolve({
        "data": {"train": data, "shuffle": True},
        "model": model_section(),
        "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": BATCH, "steps": steps},
        "comm": {"allreduce": "auto", "overlap": overlap},
        "run": {"out": out, "log_every": 0, "progress": "none"},
    })
    summary = train(cfg, MPI.COMM_WORLD)
    return {"samples_per_s": summary["samples_per_s"],
            "comm_fraction": summary["comm_seconds"] / summary["seconds"]}


def worker_torch(data: str, steps: int, warmup: int = 10) -> dict:
    """Train the same MLP with torch DDP over gloo; ranks and world size come from MPI."""
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    torch.set_num_threads(1)
    join_torch_peers(comm, "gloo")
    x, y = rank_rows(data, comm)
    ddp = torch.nn.parallel.DistributedDataParallel(torch_mlp())
    elapsed = timed_ddp_steps(ddp, x, y, BATCH, warmup, steps, comm, gpu=False)
    return {"samples_per_s": steps * BATCH * comm.size / elapsed, "comm_fraction": None}


def launch(impl: str, ranks: int, data: str, steps: int, out: str) -> dict:
    """Run one implementation on `ranks` ranks under mpiexec; return rank 0's JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               MPIFED_BLAS_THREADS="1")
    cmd = [mpiexec_path(), "-n", str(ranks), sys.executable,
           "-m", "mpifed.benchmarks.train_throughput", "--worker", impl, "--data", data,
           "--steps", str(steps), "--out", out]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} on {ranks} ranks failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench throughput", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; best is kept")
    parser.add_argument("--samples", type=int, default=16384)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch DDP peer")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--worker", choices=["ours", "ours-overlap", "torch"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = (worker_torch(args.data, args.steps) if args.worker == "torch" else
                  worker_ours(args.data, args.steps, args.out, args.worker == "ours-overlap"))
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
        best: dict = {}
        for _ in range(args.repeats):
            for ranks in args.ranks:
                for impl in impls:
                    got = launch(impl, ranks, data, args.steps, os.path.join(tmp, "out"))
                    key = (impl, ranks)
                    if key not in best or got["samples_per_s"] > best[key]["samples_per_s"]:
                        best[key] = got
    print_table(best, impls, args.ranks)
    if args.json:
        rows = [{"impl": i, "ranks": r, **best[(i, r)]} for i, r in best]
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def print_table(best: dict, impls: list[str], ranks_list: list[int]) -> None:
    print(f"# {NAME}, batch {BATCH}/rank, float32, 1 BLAS thread per rank "
          "(best of the repeats)")
    print(f"# {'impl':<12} {'ranks':>5} {'samples/s':>10} {'weak eff.':>9} {'comm %':>7} "
          f"{'ours/torch':>10}")
    for ranks in ranks_list:
        for impl in impls:
            row = best[(impl, ranks)]
            base = best[(impl, ranks_list[0])]["samples_per_s"] * ranks / ranks_list[0]
            comm = "" if row["comm_fraction"] is None else f"{100 * row['comm_fraction']:.1f}"
            ratio = ""
            if impl.startswith("ours") and ("torch", ranks) in best:
                ratio = f"{row['samples_per_s'] / best[('torch', ranks)]['samples_per_s']:.2f}x"
            print(f"  {impl:<12} {ranks:>5} {row['samples_per_s']:>10,.0f} "
                  f"{100 * row['samples_per_s'] / base:>8.1f}% {comm:>7} {ratio:>10}")


if __name__ == "__main__":
    raise SystemExit(main())
