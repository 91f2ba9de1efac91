"""GPU training throughput: mpifed on CuPy against PyTorch (CUDA) on the same MLP and batch.

    python bench/gpu_throughput.py [--ranks 1 2] [--steps 200] [--batch 128] [--no-peer]
    mpifed bench gpu [...]                                   (the same)

Needs CuPy and a CUDA device (and torch with CUDA for the peer). The benchmark MLP
784-512-256-10 (mlp.py), float32,
SGD with momentum; ours: `mpifed train` with comm.backend = "cupy" (NCCL between the GPUs of a
node), the peer: torch DDP over NCCL. Prints samples/s and the ratio, measured in the same run.
Both are warmed up alike (WARMUP steps first: kernel compilation, cuBLAS and NCCL set-up) and
timed over the steps after. Rank counts above the GPU count are skipped: NCCL needs a GPU each.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from ..launch import mpiexec_path
from .mlp import CLASSES, FEATURES, NAME, model_section
from .peers import join_torch_peers, rank_rows, timed_ddp_steps, torch_mlp

WARMUP = 20  # steps run before timing starts, by both frameworks


def worker_ours(data: str, steps: int, batch: int, out: str) -> dict:
    from mpi4py import MPI

    from ..train.config import resolve
    from ..train.loop import train

    def run(n: int, folder: str) -> dict:
        cfg = resolve({
            "data": {"train": data}, "model": model_section(),
            "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": batch, "steps": n},
            "comm": {"backend": "cupy",
                     "allreduce": "nccl" if MPI.COMM_WORLD.size > 1 else "auto"},
            "run": {"out": folder, "log_every": 0, "progress": "none", "resume": "never"},
        })
        return train(cfg, MPI.COMM_WORLD)

    run(WARMUP, out + "-warmup")  # same process: compiled kernels, cuBLAS and NCCL stay set up
    return {"samples_per_s": run(steps, out)["samples_per_s"]}


def worker_torch(data: str, steps: int, batch: int, warmup: int = WARMUP) -> dict:

    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    device = torch.device("cuda", node.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    join_torch_peers(comm, "nccl")
    x, y = rank_rows(data, comm, device)
    ddp = torch.nn.parallel.DistributedDataParallel(torch_mlp(device), device_ids=[device.index])
    elapsed = timed_ddp_steps(ddp, x, y, batch, warmup, steps, comm, gpu=True)
    return {"samples_per_s": steps * batch * comm.size / elapsed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--no-peer", action="store_true", help="time ours only (no torch)")
    parser.add_argument("--worker", choices=["ours", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        result = (worker_ours(args.data, args.steps, args.batch, args.out)
                  if args.worker == "ours" else worker_torch(args.data, args.steps, args.batch))
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
        print(f"# {'ranks':>5} {'ours':>12} {'torch':>12} {'ours/torch':>10}")
        for ranks in args.ranks:
            if ranks > gpus:
                print(f"  {ranks:>5} skipped: {gpus} GPU(s), and NCCL needs one per rank")
                continue
            got = {}
            for impl in impls:
                cmd = [mpiexec_path(), "-n", str(ranks), sys.executable, "-m",
                       "mpifed.benchmarks.gpu_throughput", "--worker", impl,
                       "--data", data, "--steps", str(args.steps), "--batch", str(args.batch),
                       "--out", os.path.join(tmp, "out")]
                done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
                if done.returncode != 0:
                    print(f"# {impl} on {ranks} ranks failed:\n{done.stderr[-1500:]}")
                    return 1
                got[impl] = json.loads(done.stdout.strip().splitlines()[-1])["samples_per_s"]
            if "torch" not in got:
                print(f"  {ranks:>5} {got['ours']:>12,.0f} {'-':>12} {'-':>10}")
                continue
            print(f"  {ranks:>5} {got['ours']:>12,.0f} {got['torch']:>12,.0f} "
                  f"{got['ours'] / got['torch']:>9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
