"""GPU training throughput: mpifed on CuPy against PyTorch CUDA eager, every model and precision.

    python bench/gpu_throughput.py                     # every case below, 1 and 2 ranks
    python bench/gpu_throughput.py --models resnet8 --precisions fp16 --steps 50
    mpifed bench gpu [...] [--warmup 10] [--records runs.jsonl]     (the same)

Cases: the benchmark MLP 784-512-256-10 (mlp.py), LeNet-5 on 1x28x28, He et al.'s CIFAR ResNet-8
and ResNet-20 on 3x32x32 (the presets), 10 classes, batch 128 per rank, SGD with momentum;
each in model.precision fp32, fp16 and bf16 (mixed precision: fp32 master weights, half
compute, dynamic loss scaling for fp16). Ours: `mpifed train`'s step with comm.backend =
"cupy" (NCCL between the GPUs of a node). The peer: the same layers in PyTorch CUDA eager
(DistributedDataParallel over NCCL on 2 ranks), fp32, or torch.autocast to float16 (with
GradScaler) or bfloat16. Each implementation runs every case in one launch, timed by the one
harness (harness.py) alike: --warmup steps first (kernel compilation, cuBLAS and NCCL set-up),
then the timed steps between device synchronisations and barriers. The table gives samples/s
and ours / torch, measured in the same run.

Sized for a lent GPU's few minutes: one launch per implementation and rank count, 2-rank
cases skipped where the machine has one GPU (NCCL needs one per rank). Without CuPy or a CUDA
device it prints why and measures nothing (exit 0), so it can be run anywhere.
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
    Steps,
    Timing,
    append_records,
    barrier_sync,
    check_counts,
    format_row,
    measure,
)
from .harness import print_table as table
from .mlp import CLASSES, FEATURES, model_section
from .ours import training_steps
from .peers import join_torch_peers, rank_rows, torch_lenet5, torch_mlp, torch_resnet

BATCH = 128
SAMPLES = 4096  # rows per model's data set: 32 global batches of 128 on one rank
MODELS = {  # name -> ([model] section, input shape or None for flat features, torch builder)
    "mlp": (model_section(), None, lambda shape, device: torch_mlp(device)),
    "lenet5": ({"kind": "lenet5"}, (1, 28, 28),
               lambda shape, device: torch_lenet5(shape, CLASSES, device)),
    "resnet8": ({"kind": "resnet", "depth": 8}, (3, 32, 32),
                lambda shape, device: torch_resnet(8, shape[0], CLASSES, device)),
    "resnet20": ({"kind": "resnet", "depth": 20}, (3, 32, 32),
                 lambda shape, device: torch_resnet(20, shape[0], CLASSES, device)),
}
PRECISIONS = ("fp32", "fp16", "bf16")


def gpu_count() -> tuple[int, str]:
    """Return (the CUDA devices CuPy sees, why none where it is 0)."""
    from ..xp import cupy_module

    cupy = cupy_module()
    if cupy is None:
        return 0, "CuPy or a CUDA device is missing"
    return cupy.cuda.runtime.getDeviceCount(), ""


def write_data(folder: str) -> None:
    """Write FOLDER/<model>.h5 for every model: `mpifed data synth`'s rows of its shape."""
    from ..data.synth import write_synthetic, write_synthetic_images

    for name, (_, shape, _) in MODELS.items():
        path = os.path.join(folder, f"{name}.h5")
        if shape is None:
            write_synthetic(path, SAMPLES, FEATURES, CLASSES, seed=0)
        else:
            write_synthetic_images(path, SAMPLES, shape, CLASSES, seed=0)


@contextmanager
def ours_steps(data: str, steps: int, batch: int, out: str, comm, model: str = "mlp",
               precision: str = "fp32"):
    """Yield the harness Steps of `mpifed train`'s step on CuPy (NCCL between the GPUs).
    steps: every step the run takes (warm-up included)."""
    from ..train.config import resolve

    cfg = resolve({
        "data": {"train": data}, "model": dict(MODELS[model][0], precision=precision),
        "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": batch, "steps": steps},
        "comm": {"backend": "cupy", "allreduce": "nccl" if comm.size > 1 else "auto"},
        "run": {"out": out, "log_every": 0, "progress": "none", "resume": "never"},
    })
    with training_steps(cfg, comm) as got:
        yield got


@contextmanager
def torch_steps(data: str, steps: int, batch: int, out: str, comm, model: str = "mlp",
                precision: str = "fp32"):
    """Yield the harness Steps of the same model in PyTorch CUDA eager (DDP over NCCL on more
    than one rank), fp32 or under torch.autocast; ranks come from MPI."""
    import torch
    from mpi4py import MPI

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    device = torch.device("cuda", node.rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    join_torch_peers(comm, "nccl")
    x, y = rank_rows(data, comm, device)
    net = MODELS[model][2](MODELS[model][1], device)
    if comm.size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index])
    with autocast_steps(net, x, y, batch, comm, precision) as got:
        yield got


@contextmanager
def autocast_steps(net, x, y, batch: int, comm, precision: str):
    """Yield the harness Steps of SGD (lr 0.01, momentum 0.9) on `net`: step i trains on batch
    i mod (rows // batch); fp16 through torch.autocast and GradScaler, bf16 through autocast
    alone, as PyTorch's AMP recipe does. Leave the torch process group afterwards."""
    import torch
    import torch.distributed as dist

    half = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    loss_fn = torch.nn.CrossEntropyLoss()
    per_epoch = x.shape[0] // batch

    def step(i: int) -> None:
        k = i % per_epoch
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=half or torch.float32, enabled=half is not None):
            loss = loss_fn(net(x[k * batch:(k + 1) * batch]), y[k * batch:(k + 1) * batch])
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    try:
        yield Steps(step, barrier_sync(comm, torch.cuda.synchronize))
    finally:
        dist.destroy_process_group()


SIDES = {"ours": ours_steps, "torch": torch_steps}  # (data, steps, batch, out, comm) -> Steps


def run_worker(impl: str, data: str, steps: int, warmup: int, batch: int, out: str,
               model: str = "mlp", precision: str = "fp32") -> dict:
    """Time `impl` on one case on the ranks of this launch with the harness: the same warm-up
    (kernel compilation, cuBLAS and NCCL set-up), timer and syncs for ours and the peer."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    with SIDES[impl](data, warmup + steps, batch, out, comm, model=model,
                     precision=precision) as steps_of:
        return measure(steps_of, steps, warmup, batch * comm.size)


def run_cases(impl: str, folder: str, cases: list, args) -> None:
    """Worker: time every (model, precision) of `cases` in turn; rank 0 prints one JSON line
    each, {"error": ...} for a case that failed (a backend that cannot run it)."""
    from mpi4py import MPI

    for model, precision in cases:
        try:
            got = run_worker(impl, os.path.join(folder, f"{model}.h5"), args.steps,
                             args.warmup, args.batch, os.path.join(folder, "out"), model,
                             precision)
        except Exception as err:  # reported in its row; the other cases still run
            got = {"error": f"{type(err).__name__}: {err}"[:300]}
        if MPI.COMM_WORLD.rank == 0:
            print(json.dumps(dict(got, model=model, precision=precision)), flush=True)


def launch(impl: str, ranks: int, folder: str, args) -> dict:
    """Run every case of one implementation on `ranks` ranks in one launch; return
    {(model, precision): rank 0's result}."""
    cmd = [*mpiexec_command(ranks), sys.executable, "-m",
           "mpifed.benchmarks.gpu_throughput", "--worker", impl, "--data", folder,
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--batch",
           str(args.batch), "--models", *args.models, "--precisions", *args.precisions]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    got = {}
    for line in done.stdout.splitlines():
        if line.startswith("{"):
            row = json.loads(line)
            got[(row["model"], row["precision"])] = row
    if done.returncode != 0 and not got:
        print(f"# {impl} on {ranks} ranks failed:\n{done.stderr[-1500:]}", flush=True)
    return got


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--precisions", nargs="+", choices=PRECISIONS, default=list(PRECISIONS))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"steps before timing, ours and torch alike (default {WARMUP})")
    parser.add_argument("--batch", type=int, default=BATCH)
    parser.add_argument("--no-peer", action="store_true", help="time ours only (no torch)")
    parser.add_argument("--records", metavar="PATH",
                        help="append one harness record per implementation, case and rank "
                             "count (JSON Lines)")
    parser.add_argument("--worker", choices=list(SIDES), help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counts(args.steps, args.warmup)
    cases = [(m, p) for m in args.models for p in args.precisions]
    if args.worker:
        run_cases(args.worker, args.data, cases, args)
        return 0
    gpus, why = gpu_count()
    if not gpus:
        print(f"# mpifed bench gpu: skipped, nothing measured: {why} on this machine "
              "(run it where a GPU is lent)", flush=True)
        return 0
    impls = ("ours",) if args.no_peer or not torch_has_cuda() else ("ours", "torch")
    if "torch" not in impls and not args.no_peer:
        print("# the peer is skipped: torch with CUDA is not installed", flush=True)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        write_data(tmp)
        print(f"# GPU: batch {args.batch}/rank, {args.steps} timed steps after {args.warmup}; "
              "ours = model.precision, torch = eager fp32 or torch.autocast", flush=True)
        table(COLUMNS, [])  # the header; rows print as each launch ends
        for ranks in args.ranks:
            if ranks > gpus:
                print(f"  {ranks:>5} skipped: {gpus} GPU(s), and NCCL needs one per rank",
                      flush=True)
                continue
            got = {impl: launch(impl, ranks, tmp, args) for impl in impls}
            for case in cases:
                print_row(ranks, case, {impl: got[impl].get(case) for impl in impls})
                records += [record(impl, ranks, case, got[impl][case], args) for impl in impls
                            if got[impl].get(case) and "error" not in got[impl][case]]
    if args.records:
        append_records(args.records, records)
    return 0


def torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def _rate(row) -> str:
    if row is None:
        return "-"
    return "failed" if "error" in row else f"{row['samples_per_s']:,.0f}"


COLUMNS = [
    Column("ranks", 5, lambda r: str(r["ranks"])),
    Column("model", 8, lambda r: r["model"]),
    Column("precision", 9, lambda r: r["precision"]),
    Column("ours", 12, lambda r: _rate(r["ours"])),
    Column("torch", 12, lambda r: _rate(r["torch"])),
    Column("ours/torch", 10, lambda r: f"{r['ratio']:.2f}x" if r["ratio"] else "-"),
]


def print_row(ranks: int, case: tuple, got: dict) -> None:
    """Print one case's samples/s and ratio (and why a side failed, under the row)."""
    ours, peer = got.get("ours"), got.get("torch")
    ratio = None
    if ours and peer and "error" not in ours and "error" not in peer:
        ratio = ours["samples_per_s"] / peer["samples_per_s"]
    print(format_row(COLUMNS, {"ranks": ranks, "model": case[0], "precision": case[1],
                               "ours": ours, "torch": peer, "ratio": ratio}), flush=True)
    for impl, row in got.items():
        if row and "error" in row:
            print(f"        {impl}: {row['error']}", flush=True)


def record(impl: str, ranks: int, case: tuple, got: dict, args) -> Record:
    """The harness record of one implementation on one case on `ranks` GPUs."""
    model, precision = case
    config = {"model": model, "precision": precision, "batch_per_rank": args.batch,
              "dtype": "float32", "backend": "torch-cuda" if impl == "torch" else "cupy",
              "allreduce": "nccl" if ranks > 1 else "none"}
    return Record.build("gpu", "torch" if impl == "torch" else "mpifed", impl, ranks,
                        config, [Timing.from_dict(got["timing"])],
                        {"comm_fraction": got["comm_fraction"]}, got["machine"])


if __name__ == "__main__":
    raise SystemExit(main())
