"""GPT training throughput: mpifed's data-parallel step against PyTorch DDP (gloo) on the same
nanoGPT shape, batch and ranks, in one launch.

    OMP_NUM_THREADS=1 mpiexec -n 2 python -m mpifed bench gpt [--layers 4 --heads 4 --width 256
        --context 128 --batch 8 --steps 10 --warmup 3 --repeats 2 --recompute]

Both sides: vocabulary 256, float32, AdamW, the same random token windows (each rank its own),
one thread per rank (torch.set_num_threads(1); NumPy's BLAS from OMP_NUM_THREADS). Ours is the
step `mpifed train` runs (comm.shard = "none", one all-reduce of the flat gradients); the peer is
a nanoGPT-shaped torch model (F.scaled_dot_product_attention, as nanoGPT with flash) wrapped in
DistributedDataParallel over gloo. Repeats alternate ours and torch; the best of each is
reported as tokens/s (all ranks) and their ratio, measured side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np

from ..cli.output import emit
from .harness import barrier_sync


def parse(argv):
    p = argparse.ArgumentParser(prog="mpifed bench gpt")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--batch", type=int, default=8, help="windows per rank per step")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--recompute", action="store_true", help="ours with model.recompute")
    p.add_argument("--no-torch", action="store_true")
    return p.parse_args(argv)


def windows(args, comm, step: int):
    """This rank's (x, y) token windows of `step` (the same on both sides)."""
    rng = np.random.default_rng([step, comm.rank])
    w = rng.integers(0, 256, (args.batch, args.context + 1))
    return w[:, :-1], w[:, 1:]


def timed(step, sync, args) -> float:
    """Seconds per step of `step(i)` after the warm-up, between barriers."""
    for i in range(args.warmup):
        step(i)
    sync()
    began = time.perf_counter()
    for i in range(args.steps):
        step(args.warmup + i)
    sync()
    return (time.perf_counter() - began) / args.steps


def ours(args, comm):
    """The step function of mpifed's GPT and the activation bytes it held."""
    from ..hostmem import keep_freed_memory
    from ..nn.gpt import gpt
    from ..optim import make_optimizer
    from ..train.step import DataParallelStep

    keep_freed_memory()  # as `mpifed train` does on the host (before torch's allocations too)
    spec = gpt(256, args.context, args.layers, args.heads, args.width, recompute=args.recompute)
    params = spec.init(0)
    step_fn = DataParallelStep(spec, params, comm, "mpi", np, False, stall_timeout=0)
    opt = make_optimizer(argparse.Namespace(name="adamw", beta1=0.9, beta2=0.95, eps=1e-8,
                                            weight_decay=0.1, grad_clip=1.0), spec)
    batches = [windows(args, comm, i) for i in range(4)]

    def step(i):
        x, y = batches[i % 4]
        step_fn(x.astype(np.float32), y, opt, 3e-4, i + 1)
    return step, spec, step_fn


def torch_peer(args, comm):
    """The DDP step of a nanoGPT-shaped torch GPT over gloo."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from torch.nn.parallel import DistributedDataParallel

    from .peers import join_torch_peers

    class Block(nn.Module):
        def __init__(self, c, h):
            super().__init__()
            self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
            self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
            self.mlp = nn.Sequential(nn.Linear(c, 4 * c), nn.GELU(approximate="tanh"),
                                     nn.Linear(4 * c, c))
            self.h = h

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.c_attn(self.ln_1(x)).split(c, dim=2)
            q, k, v = (a.view(b, t, self.h, c // self.h).transpose(1, 2) for a in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
            return x + self.mlp(self.ln_2(x))

    class GPT(nn.Module):
        def __init__(self):
            super().__init__()
            c = args.width
            self.wte, self.wpe = nn.Embedding(256, c), nn.Embedding(args.context, c)
            self.h = nn.ModuleList([Block(c, args.heads) for _ in range(args.layers)])
            self.ln_f = nn.LayerNorm(c)

        def forward(self, idx):
            x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
            for block in self.h:
                x = block(x)
            return self.ln_f(x) @ self.wte.weight.T  # tied head

    torch.set_num_threads(1)
    torch.manual_seed(0)
    join_torch_peers(comm, "gloo")
    ddp = DistributedDataParallel(GPT())
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1)
    batches = [tuple(torch.from_numpy(a) for a in windows(args, comm, i)) for i in range(4)]

    def step(i):
        x, y = batches[i % 4]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(ddp(x).view(-1, 256), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ddp.parameters(), 1.0)
        opt.step()
    return step


def main(argv=None) -> int:
    from mpi4py import MPI

    args = parse(argv)
    comm = MPI.COMM_WORLD
    sync = barrier_sync(comm)
    tokens = args.batch * args.context * comm.size
    step, spec, _ = ours(args, comm)
    peer = None if args.no_torch else torch_peer(args, comm)
    best = {"ours": math.inf, "torch": math.inf}
    for _ in range(args.repeats):
        best["ours"] = min(best["ours"], timed(step, sync, args))
        if peer is not None:
            best["torch"] = min(best["torch"], timed(peer, sync, args))
    if comm.rank == 0:
        result = {"ranks": comm.size, "layers": args.layers, "heads": args.heads,
                  "width": args.width, "context": args.context, "batch_per_rank": args.batch,
                  "recompute": args.recompute, "parameters": spec.layout().size,
                  "ours_tokens_per_s": tokens / best["ours"],
                  "activation_bytes": int(spec.activation_bytes)}
        if peer is not None:
            result["torch_tokens_per_s"] = tokens / best["torch"]
            result["ratio"] = best["torch"] / best["ours"]
        emit(json.dumps(result))
    if peer is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
