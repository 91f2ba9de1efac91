"""Convnet training throughput: mpifed against PyTorch DDP on LeNet-5, ResNet-8 and ResNet-20.

    python bench/cnn_throughput.py [--ranks 1 2] [--steps 60] [--models lenet5 resnet8 resnet20]
    mpifed bench cnn [...]                                          (the same)
    mpifed bench cnn --backend cupy                 (on GPUs: CuPy against PyTorch CUDA)
    mpifed bench cnn --warmup 10 --records runs.jsonl  (harness records, JSON Lines)

Models: the `lenet5` preset on 1x28x28 images and the `resnet` preset with depth 8 and 20 on
3x32x32 (He et al.'s CIFAR ResNet), 10 classes, float32, batch 64 per rank, SGD with momentum, on the
image-shaped synthetic data of `mpifed data synth --shape` (each rank its shard). The peer
builds the same layers in torch (peers.torch_lenet5, peers.torch_resnet) and trains them with
DistributedDataParallel: over gloo on CPUs with one thread per rank (ours: one BLAS thread per
rank; "ours-overlap" sets comm.overlap, as DDP overlaps its buckets), over NCCL on GPUs. Each
implementation runs under the same mpiexec in turn and is timed by the one harness (harness.py):
--warmup steps, a barrier, then --steps timed steps ending in a barrier (and a device
synchronise on GPUs), ours (`mpifed train`'s step, ours.py) and torch alike; repeats alternate
and the best is kept. The table gives samples/s and ours / torch, measured in the same run: of
the best runs, and the median over the repeats of each repeat's ratio (a busy host disturbs one
repeat's pair alike, the best of each side may come from different moments).

After the table (unless --no-breakdown), one rank's forward and backward time per layer type
(mpifed.nn.layers.profile; CPU time on the host, which a busy machine disturbs less than wall
time; synchronised wall time on a GPU) for each model, next to the same step in torch, so the
ratio can be read against where the time goes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..launch import mpiexec_command
from .harness import (
    WARMUP,
    Column,
    Record,
    Timing,
    append_records,
    check_counts,
    measure,
    time_steps,
)
from .harness import print_table as table
from .ours import training_steps
from .peers import ddp_steps, join_torch_peers, rank_rows

BATCH = 64
CLASSES = 10
MODELS = {  # name -> ([model] section, input shape (C, H, W))
    "lenet5": ({"kind": "lenet5"}, (1, 28, 28)),
    "resnet8": ({"kind": "resnet", "depth": 8}, (3, 32, 32)),
    "resnet20": ({"kind": "resnet", "depth": 20}, (3, 32, 32)),
}
THREADS = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                  "MPIFED_BLAS_THREADS")}


def torch_model(name: str, device=None):
    """The peer's copy of model `name` (torch)."""
    from .peers import torch_lenet5, torch_resnet

    shape = MODELS[name][1]
    if name == "lenet5":
        return torch_lenet5(shape, CLASSES, device)
    return torch_resnet(MODELS[name][0]["depth"], shape[0], CLASSES, device)


@contextmanager
def ours_steps(name: str, data: str, steps: int, out: str, backend: str, comm,
               overlap: bool = False):
    """Yield the harness Steps of `mpifed train`'s step on this rank's shard.
    steps: every step the run takes (warm-up included); overlap: comm.overlap (each layer's
    all-reduce starts as soon as its gradients are final)."""
    from ..train.config import resolve

    def config(n: int):
        return resolve({
            "data": {"train": data, "shuffle": True},
            "model": MODELS[name][0],
            "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": BATCH, "steps": n},
            "comm": {"backend": backend,
                     "allreduce": "nccl" if backend == "cupy" and comm.size > 1 else "auto",
                     "overlap": overlap},
            "run": {"out": out, "log_every": 0, "progress": "none", "resume": "never"},
        })

    with training_steps(config(steps), comm) as got:
        yield got


@contextmanager
def torch_steps(name: str, data: str, steps: int, out: str, backend: str, comm):
    """Yield the harness Steps of the same model in torch DDP (gloo on CPUs, NCCL on GPUs);
    ranks come from MPI."""
    import torch
    from mpi4py import MPI

    gpu = backend == "cupy"
    device = None
    if gpu:
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        device = torch.device("cuda", node.rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    join_torch_peers(comm, "nccl" if gpu else "gloo")
    x, y = rank_rows(data, comm, device)
    model = torch_model(name, device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if gpu else None)
    with ddp_steps(ddp, x, y, BATCH, comm, gpu) as got:
        yield got


SIDES = {  # impl -> its Steps, as (model, data, steps, out, backend, comm) -> context manager
    "ours": ours_steps,
    "ours-overlap": lambda *args: ours_steps(*args, overlap=True),
    "torch": torch_steps,
}


def run_worker_steps(impl: str, name: str, data: str, steps: int, warmup: int, out: str,
                     backend: str) -> dict:
    """Time `impl` on model `name` on the ranks of this launch with the harness: the same
    warm-up, timer and syncs for ours and the peer. Returns harness.measure's result."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    with SIDES[impl](name, data, warmup + steps, out, backend, comm) as steps_of:
        return measure(steps_of, steps, warmup, BATCH * comm.size)


def launch(impl: str, name: str, ranks: int, data: str, steps: int, warmup: int, out: str,
           backend: str) -> dict:
    """Run one implementation of one model on `ranks` ranks under mpiexec; return rank 0's
    JSON result."""
    cmd = [*mpiexec_command(ranks), sys.executable, "-m",
           "mpifed.benchmarks.cnn_throughput", "--worker", impl, "--models", name,
           "--data", data, "--steps", str(steps), "--warmup", str(warmup), "--out", out,
           "--backend", backend]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **THREADS),
                          timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} {name} on {ranks} ranks failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_breakdown(name: str, backend: str) -> dict:
    """`layer_breakdown` in a process of its own, with one BLAS thread as the runs had."""
    cmd = [sys.executable, "-m", "mpifed.benchmarks.cnn_throughput", "--worker", "breakdown",
           "--models", name, "--backend", backend]
    done = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **THREADS),
                          timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"the {name} breakdown failed:\n{done.stderr[-2000:]}")
    got = json.loads(done.stdout.strip().splitlines()[-1])
    got["ours"] = {tuple(key.split(".")): s for key, s in got["ours"].items()}
    return got


def layer_breakdown(name: str, backend: str, steps: int = 10) -> dict:
    """Time one rank's forward and backward per layer type on one batch of model `name`.

    Returns {"ours": {(type, pass): seconds per step}, "ours_step": s, "torch_step": s or
    None}; CPU time (process_time) on the host, synchronised wall time on a GPU.
    """
    from ..config import ModelConfig
    from ..hostmem import keep_freed_memory
    from ..nn.layers import Context
    from ..nn.layers.profile import LayerTimings
    from ..nn.spec import model_from_config
    from ..xp import backend_module

    xp = backend_module(backend)
    if xp is np:
        keep_freed_memory()  # as `mpifed train` does on the host
    section, shape = MODELS[name]
    model = model_from_config(ModelConfig(**section), shape, CLASSES)
    flat = model.init(0, xp)
    grad = xp.zeros_like(flat)
    rng = np.random.default_rng(0)
    x = xp.asarray(rng.standard_normal((BATCH, *shape)).astype(np.float32))
    y = xp.asarray(rng.integers(0, CLASSES, BATCH))
    gpu = xp is not np
    sync = (lambda: xp.cuda.get_current_stream().synchronize()) if gpu else None
    timings = LayerTimings(sync, time.perf_counter if gpu else time.process_time)

    def step(i: int) -> None:  # the profile counts the timed steps only
        if i < WARMUP:
            model.loss_and_grad(flat, x, y, grad)
        else:
            model.loss_and_grad(flat, x, y, grad, ctx=Context(timings=timings))

    timing = time_steps(step, 1, WARMUP, repeats=steps, sync=sync)
    result = {"ours": {k: v / steps for k, v in timings.table().items()},
              "ours_step": step_seconds(timing, gpu), "torch_step": None}
    try:
        result["torch_step"] = torch_step_seconds(name, steps, gpu)
    except ImportError:
        pass
    return result


def step_seconds(timing, gpu: bool) -> float:
    """The median step of a one-rank timing: synchronised wall time on a GPU, CPU time on the
    host (a busy machine disturbs it less)."""
    return float(np.median(timing.seconds if gpu else timing.cpu_seconds))


def torch_step_seconds(name: str, steps: int, gpu: bool) -> float:
    """The median time of one forward and backward of the peer's model on one batch."""
    import torch

    device = torch.device("cuda") if gpu else None
    if not gpu:
        torch.set_num_threads(1)
    model = torch_model(name, device)
    shape = MODELS[name][1]
    x = torch.randn(BATCH, *shape, device=device)
    y = torch.randint(0, CLASSES, (BATCH,), device=device)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(i: int) -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()

    timing = time_steps(step, 1, WARMUP, repeats=steps,
                        sync=torch.cuda.synchronize if gpu else None)
    return step_seconds(timing, gpu)


def write_data(folder: str, samples: int) -> dict:
    """Write one synthetic image set per input shape (`mpifed data synth --shape`)."""
    from ..data.synth import write_synthetic_images

    paths = {}
    for name, (_, shape) in MODELS.items():
        paths[name] = os.path.join(folder, f"{name}.h5")
        write_synthetic_images(paths[name], samples, shape, CLASSES, seed=0)
    return paths


def cupy_ready() -> bool:
    from ..xp import cupy_module

    return cupy_module() is not None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench cnn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--steps", type=int, default=60, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help=f"steps before timing, ours and torch alike (default {WARMUP})")
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; best is kept")
    parser.add_argument("--samples", type=int, default=4096, help="synthetic images per set")
    parser.add_argument("--backend", choices=["numpy", "cupy"], default="numpy",
                        help="numpy: CPUs against torch CPU/gloo; cupy: GPUs against CUDA/NCCL")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch DDP peer")
    parser.add_argument("--no-overlap", action="store_true",
                        help="skip ours-overlap (comm.overlap), which halves nothing on CPUs")
    parser.add_argument("--no-breakdown", action="store_true",
                        help="skip the per-layer-type forward/backward times")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--records", metavar="PATH",
                        help="append one harness record per model, implementation and rank "
                             "count (JSON Lines)")
    parser.add_argument("--worker", choices=[*SIDES, "breakdown"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_counts(args.steps, args.warmup, args.repeats)
    if args.worker:
        return run_worker(args)
    if args.backend == "cupy" and not cupy_ready():
        print("# skipped: --backend cupy needs CuPy and a CUDA device (pip install mpifed[gpu] "
              "on a GPU machine)")
        return 0
    impls = ["ours"] + ([] if args.no_overlap else ["ours-overlap"])
    impls += [] if args.no_torch or not torch_ready(args.backend) else ["torch"]
    ranks_list = usable_ranks(args.ranks, args.backend)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_data(tmp, args.samples)
        runs: dict = {}
        for _ in range(args.repeats):
            for name in args.models:
                for ranks in ranks_list:
                    for impl in impls:
                        got = launch(impl, name, ranks, paths[name], args.steps, args.warmup,
                                     os.path.join(tmp, "out"), args.backend)
                        runs.setdefault((name, impl, ranks), []).append(got)
    best = {key: max(got, key=lambda g: g["samples_per_s"]) for key, got in runs.items()}
    print_table(best, impls, args.models, ranks_list, args.backend, median_ratios(runs))
    breakdowns = {}
    if not args.no_breakdown:
        for name in args.models:
            breakdowns[name] = run_breakdown(name, args.backend)
            print_breakdown(name, breakdowns[name], args.backend)
    if args.records:
        append_records(args.records, [record(key, got, args) for key, got in runs.items()])
    if args.json:
        rows = [{"model": m, "impl": i, "ranks": r,
                 **{k: best[(m, i, r)][k] for k in ("samples_per_s", "comm_fraction")}}
                for m, i, r in best]
        extra = {m: {"ours": {f"{t}.{p}": s for (t, p), s in b["ours"].items()},
                     "ours_step": b["ours_step"], "torch_step": b["torch_step"]}
                 for m, b in breakdowns.items()}
        Path(args.json).write_text(json.dumps({"runs": rows, "breakdown": extra}, indent=1))
    return 0


def run_worker(args) -> int:
    name = args.models[0]
    if args.worker == "breakdown":
        got = layer_breakdown(name, args.backend)
        got["ours"] = {f"{t}.{p}": s for (t, p), s in got["ours"].items()}
        print(json.dumps(got), flush=True)
        return 0
    result = run_worker_steps(args.worker, name, args.data, args.steps, args.warmup, args.out,
                              args.backend)
    from mpi4py import MPI

    if MPI.COMM_WORLD.rank == 0:
        print(json.dumps(result), flush=True)
    return 0


def record(key: tuple, runs: list[dict], args) -> Record:
    """The harness record of one model, implementation and rank count, launches pooled."""
    name, impl, ranks = key
    best = max(runs, key=lambda g: g["samples_per_s"])
    config = {"model": name, "input_shape": list(MODELS[name][1]), "batch_per_rank": BATCH,
              "samples": args.samples, "dtype": "float32", "backend": args.backend,
              "overlap": impl == "ours-overlap"}
    return Record.build("cnn", "torch-ddp" if impl == "torch" else "mpifed", impl, ranks, config,
                        [Timing.from_dict(g["timing"]) for g in runs],
                        {"comm_fraction": best["comm_fraction"]}, best["machine"])


def torch_ready(backend: str) -> bool:
    """Tell whether the peer can run (torch installed, with CUDA for the GPU variant)."""
    try:
        import torch
    except ImportError:
        print("# torch not installed: the DDP peer is skipped (pip install torch==2.13.0)")
        return False
    if backend == "cupy" and not torch.cuda.is_available():
        print("# torch has no CUDA device: the peer is skipped")
        return False
    return True


def usable_ranks(ranks_list: list[int], backend: str) -> list[int]:
    """The rank counts to run; on GPUs, those with a GPU per rank (NCCL needs one each)."""
    if backend != "cupy":
        return ranks_list
    from ..xp import cupy_module

    gpus = cupy_module().cuda.runtime.getDeviceCount()
    for ranks in ranks_list:
        if ranks > gpus:
            print(f"# {ranks} ranks skipped: {gpus} GPU(s), and NCCL needs one per rank")
    return [r for r in ranks_list if r <= gpus]


def median_ratios(runs: dict) -> dict:
    """{(model, impl, ranks): the median over repeats of ours / torch within each repeat}."""
    out = {}
    for (name, impl, ranks), got in runs.items():
        peer = runs.get((name, "torch", ranks))
        if peer and impl != "torch":
            out[(name, impl, ranks)] = float(np.median(
                [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(got, peer)]))
    return out


def print_table(best: dict, impls: list[str], models: list[str], ranks_list: list[int],
                backend: str, medians: dict | None = None) -> None:
    """Print the best run of each model, implementation and rank count."""
    where = "GPU, CuPy vs torch CUDA/NCCL" if backend == "cupy" else \
        "CPU, 1 BLAS thread per rank, torch DDP over gloo"
    rows = []
    for name in models:
        for ranks in ranks_list:
            for impl in impls:
                peer = best.get((name, "torch", ranks))
                row = dict(best[(name, impl, ranks)], model=name, impl=impl, ranks=ranks)
                row["ratio"] = (row["samples_per_s"] / peer["samples_per_s"]
                                if peer and impl.startswith("ours") else None)
                row["median"] = (medians or {}).get((name, impl, ranks))
                rows.append(row)
    table(COLUMNS, rows, f"convnets, batch {BATCH}/rank, float32, {where} (best of the repeats)")


COLUMNS = [
    Column("model", 8, lambda r: r["model"], "<"),
    Column("impl", 12, lambda r: r["impl"], "<"),
    Column("ranks", 5, lambda r: str(r["ranks"])),
    Column("samples/s", 10, lambda r: f"{r['samples_per_s']:,.0f}"),
    Column("comm %", 7, lambda r: "" if r["comm_fraction"] is None
           else f"{100 * r['comm_fraction']:.1f}"),
    Column("ours/torch", 10, lambda r: "" if r["ratio"] is None else f"{r['ratio']:.2f}x"),
    Column("median", 7, lambda r: "" if r.get("median") is None else f"{r['median']:.2f}x"),
]


def print_breakdown(name: str, result: dict, backend: str) -> None:
    clock = "wall time, synchronised" if backend == "cupy" else "CPU time"
    print(f"# {name}: one rank, batch {BATCH}, forward + backward per layer type "
          f"(ms per step, {clock})")
    forward = {t: s for (t, p), s in result["ours"].items() if p == "forward"}
    backward = {t: s for (t, p), s in result["ours"].items() if p == "backward"}
    total = sum(result["ours"].values())
    for kind in sorted(set(forward) | set(backward),
                       key=lambda t: -(forward.get(t, 0) + backward.get(t, 0))):
        both = forward.get(kind, 0) + backward.get(kind, 0)
        print(f"  {kind:<15} forward {1e3 * forward.get(kind, 0):8.2f}  backward "
              f"{1e3 * backward.get(kind, 0):8.2f}  ({100 * both / total:4.1f}%)")
    line = f"  step: ours {1e3 * result['ours_step']:.2f} ms (layers {1e3 * total:.2f} ms)"
    if result["torch_step"]:
        line += f", torch {1e3 * result['torch_step']:.2f} ms, ours/torch speed " \
                f"{result['torch_step'] / result['ours_step']:.2f}x"
    print(line)


if __name__ == "__main__":
    raise SystemExit(main())
