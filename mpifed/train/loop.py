"""Synchronous data-parallel SGD: each rank's batch, one all-reduce, the same update everywhere.

    mpiexec -n 4 mpifed train run.toml --set optim.lr=0.05      # one node, or many
    srun --mpi=pmi2 mpifed train run.toml                       # under SLURM

With p ranks and a per-rank batch b, a step equals single-process SGD on the global batch of p*b
rows: rank 0's rows, then rank 1's, ... (each rank's mean gradient, averaged over ranks).
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from ..comm import backend_module, select_device
from ..comm.agree import raise_together
from ..xp import device_copier, get_array_module
from ..comm.topology import ranks_per_node
from ..data.atomic import atomic_path
from ..data.stream import Prefetcher, shard_stream
from ..errors import UserError
from ..nn.io import load_model, save_model
from ..nn.models import ModelSpec, init_params
from ..optim import learning_rate, make_optimizer
from .checkpoint import checkpoint_dir, choose_checkpoint, save_checkpoint
from .config import to_toml
from .evaluate import evaluate, open_checked_shard, open_test_shard
from .report import Reporter
from .signals import StopFlag
from .step import DataParallelStep
from .timeline import Timeline


def blas_threads_per_rank(comm) -> int:
    """Return this rank's share of the node's cores, so co-located ranks do not oversubscribe.

    `MPIFED_BLAS_THREADS=k` sets it instead (benchmarks pin one thread per rank).
    """
    forced = os.environ.get("MPIFED_BLAS_THREADS")
    if forced:
        return max(1, int(forced))
    ranks_here = ranks_per_node(comm)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // ranks_here)


def build_model(cfg: dict, features: int, classes: int, xp, dtype):
    """Return (spec, flat params) from model.init, or initialised from run.seed."""
    model = cfg["model"]
    if model["init"]:
        spec, host = load_model(model["init"], dtype)
        if (spec.features, spec.num_classes) != (features, classes):
            raise UserError(f"model.init: {model['init']!r} maps {spec.features} features to "
                            f"{spec.num_classes} classes; the data has {features} and {classes}")
        return spec, xp.asarray(host)
    spec = ModelSpec(model["kind"], features, tuple(model["hidden"]), classes)
    return spec, init_params(spec, cfg["run"]["seed"], xp, dtype)


def plan_steps(cfg: dict, shard_len: int, comm) -> tuple[int, int]:
    """Return (steps_per_epoch, total_steps): the smallest shard decides for every rank."""
    batch = cfg["optim"]["batch_size"]
    smallest = comm.allreduce(shard_len, op=MPI.MIN)
    per_epoch = smallest // batch
    if per_epoch == 0:
        raise UserError(f"optim.batch_size: {batch} rows per rank is more than the smallest "
                        f"shard ({smallest} rows on {comm.size} ranks); lower optim.batch_size "
                        "or use fewer ranks")
    steps = cfg["optim"]["steps"] or cfg["optim"]["epochs"] * per_epoch
    return per_epoch, steps


def prepare_out(cfg: dict, comm) -> str:
    """Create run.out on rank 0 and write the resolved config there; return the folder."""
    out = cfg["run"]["out"]

    def make():
        if comm.rank == 0:
            try:
                os.makedirs(out, exist_ok=True)
                with atomic_path(os.path.join(out, "config.toml")) as tmp, open(tmp, "w") as fh:
                    fh.write(to_toml(cfg))
            except OSError as err:
                raise UserError(f"run.out: cannot write to {out!r} ({err.strerror})") from None
    raise_together(comm, make)
    return out


def train(cfg: dict, comm=None) -> dict:
    """Run the training that `cfg` (a resolved config) describes on `comm`; return the summary."""
    comm = comm or MPI.COMM_WORLD
    xp = raise_together(comm, lambda: _backend(cfg))
    if xp is not np:
        select_device(comm)
    with threadpool_limits(limits=blas_threads_per_rank(comm)):
        if cfg.get("federated"):
            from ..federated.rounds import federate

            return federate(cfg, comm, xp)
        return _train(cfg, comm, xp)


def _backend(cfg):
    try:
        return backend_module(cfg["comm"]["backend"])
    except ValueError as err:
        raise UserError(f"comm.backend: {err}") from None


def _train(cfg: dict, comm, xp) -> dict:
    data, optim, run = cfg["data"], cfg["optim"], cfg["run"]
    dtype = np.dtype(cfg["model"]["dtype"])
    shard, classes = open_checked_shard(comm, data["train"], data["x"], data["y"], dtype,
                                        "data.train")
    spec, params = raise_together(comm, lambda: build_model(cfg, shard.info.features, classes,
                                                            xp, dtype))
    per_epoch, total = plan_steps(cfg, len(shard), comm)
    test = None
    if data["test"]:
        test = open_test_shard(comm, cfg, spec, dtype)
    out = prepare_out(cfg, comm)
    optimizer = make_optimizer(optim)
    first = resume_step(cfg, comm, params, optimizer)
    reporter = Reporter(out, comm.rank == 0, total, run["progress"], append=first > 0)
    reporter.line(f"mpifed train: {comm.size} ranks, {spec.kind} {spec.sizes}, "
                  f"{shard.info.samples} samples, global batch {optim['batch_size'] * comm.size}, "
                  f"{total} steps ({per_epoch} per epoch), backend {xp.__name__}"
                  + (f", resumed at step {first}" if first else ""))
    if first:
        reporter.record(event="resumed", step=first)
    step_fn = DataParallelStep(spec, params, comm, cfg["comm"]["allreduce"], xp,
                               cfg["comm"]["overlap"])
    timeline = Timeline(run["timeline"], comm.rank)
    loader = batch_loader(cfg, shard, per_epoch, comm.rank, first, xp, timeline)
    window = Window(optim["batch_size"] * comm.size)
    start, loss, stopped = time.perf_counter(), math.nan, ""
    try:
        with StopFlag() as flag:
            for step in range(first, total):
                t_data = time.perf_counter()
                epoch, x, y = loader.get()
                t_compute, comm_before = time.perf_counter(), step_fn.comm_seconds
                lr = learning_rate(step, optim["lr"], total, optim["schedule"], optim["warmup"],
                                   optim["step_size"], optim["gamma"])
                loss = step_fn(x, y, optimizer, lr, step + 1, stop=flag.value)
                done = step + 1
                trace_step(timeline, done, t_data, t_compute, step_fn.comm_seconds - comm_before)
                log = run["log_every"] > 0 and (done % run["log_every"] == 0 or done == total)
                rate, comm_share = window.tick(step_fn.comm_seconds, log)
                reporter.step(done, epoch, loss, lr, rate, comm_share, log)
                if test is not None and run["eval_every"] and done % run["eval_every"] == 0:
                    reporter.record(event="eval", step=done,
                                    **evaluate(spec, params, test, comm, xp))
                every = run["checkpoint_every"]
                if step_fn.stop_agreed or (every and done % every == 0 and done < total):
                    write_checkpoint(cfg, comm, params, optimizer, done, per_epoch)
                if step_fn.stop_agreed:
                    stopped = flag.raised or "a signal on another rank"
                    break
    finally:
        loader.close()
        step_fn.close()
    step_fn.free()
    timeline.write(comm, os.path.join(out, "timeline.json"))
    if stopped:
        return stop_early(cfg, comm, reporter, done, stopped)
    return finish(cfg, comm, spec, params, test, reporter, xp, (first, total),
                  (time.perf_counter() - start, step_fn.comm_seconds, loader.wait_seconds), loss)


def batch_loader(cfg: dict, shard, per_epoch: int, rank: int, steps_done: int, xp,
                 timeline=None) -> Prefetcher:
    """Return the prefetching loader of this rank's stream, placed after `steps_done` steps.

    rank: this rank's place in the communicator that sharded the data (it seeds the shuffle).
    timeline: where a streamed shard's block reads are traced (optional).
    """
    data = cfg["data"]
    stream = shard_stream(shard, cfg["optim"]["batch_size"], per_epoch, cfg["run"]["seed"],
                          rank, data["shuffle"], epoch=steps_done // per_epoch,
                          step=steps_done % per_epoch, block=data["shuffle_block"],
                          buffer=data["shuffle_buffer"], timeline=timeline)
    return Prefetcher(shard, stream, device_copier(xp))


def trace_step(timeline, step: int, t_data: float, t_compute: float, comm: float) -> None:
    """Record a step's data wait, compute and communication spans (comm came last)."""
    if timeline.enabled:
        end = time.perf_counter()
        timeline.span("data", t_data, t_compute, step)
        timeline.span("compute", t_compute, end - comm, step)
        timeline.span("allreduce", end - comm, end, step)


class Window:
    """Samples/s and communication share over the steps since the last logged one."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.start, self.steps, self.comm_start = time.perf_counter(), 0, 0.0

    def tick(self, comm_seconds: float, reset: bool) -> tuple[float, float]:
        self.steps += 1
        now = time.perf_counter()
        elapsed = max(now - self.start, 1e-9)
        rate = self.steps * self.samples_per_step / elapsed
        share = (comm_seconds - self.comm_start) / elapsed
        if reset:
            self.start, self.steps, self.comm_start = now, 0, comm_seconds
        return rate, share


def layout_of(comm) -> dict:
    """The MPI layout a checkpoint is valid for."""
    return {"ranks": comm.size}


def resume_step(cfg: dict, comm, params, optimizer) -> int:
    """Load the checkpoint run.resume points at into params and optimiser; return its step."""
    found = raise_together(comm, lambda: choose_checkpoint(cfg, "step", layout_of(comm))
                           if comm.rank == 0 else None)
    found = comm.bcast(found, root=0)
    if found is None:
        return 0
    xp = get_array_module(params)
    params[...] = xp.asarray(found["params"])
    optimizer.load_state({k: xp.asarray(v) if np.ndim(v) else v
                          for k, v in found["state"].items()})
    return int(found["counters"]["step"])


def write_checkpoint(cfg: dict, comm, params, optimizer, step: int, per_epoch: int) -> None:
    """Rank 0 writes the checkpoint of `step`; every rank waits until it is on disk.

    Every rank walks its shard in lockstep, so one (epoch, step in epoch) places every rank's
    stream; the permutations derive from (run.seed, epoch, rank), the only RNG state there is.
    """
    if comm.rank == 0:
        counters = {"step": step, "epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
                    "rng": {"seed": cfg["run"]["seed"], "permutation": "(seed, epoch, rank)"}}
        save_checkpoint(cfg["run"]["out"], "step", step, params, optimizer.state(), counters,
                        cfg, layout_of(comm), cfg["run"]["keep_checkpoints"])
    comm.Barrier()


def stop_early(cfg, comm, reporter, step: int, why: str) -> dict:
    """Report a stop on request (preemption): the checkpoint of `step` is on disk."""
    reporter.record(event="stopped", step=step, reason=why)
    reporter.line(f"stopped by {why} after step {step}; checkpoint in "
                  f"{checkpoint_dir(cfg['run']['out'])}; run the same command to resume")
    reporter.close()
    comm.Barrier()
    return {"event": "stopped", "step": step, "reason": why}


def finish(cfg, comm, spec, params, test, reporter, xp, span, timings, loss) -> dict:
    """Evaluate, write the model and the summary; return the summary.

    span: (first, total) steps; timings: (seconds, in all-reduces, waiting for data) that this
    process spent on steps first..total-1.
    """
    (first, steps), (seconds, comm_seconds, data_seconds) = span, timings
    out, per_step = cfg["run"]["out"], cfg["optim"]["batch_size"] * comm.size
    summary = {"event": "summary", "steps": steps, "samples": steps * per_step,
               "seconds": seconds, "loss": loss if math.isfinite(loss) else None,
               "comm_seconds": comm_seconds,
               "data_wait_seconds": data_seconds,
               "samples_per_s": (steps - first) * per_step / max(seconds, 1e-9)}
    if first:
        summary["resumed_from"] = first
    if test is not None:
        result = evaluate(spec, params, test, comm, xp)
        reporter.record(event="eval", step=steps, **result)
        summary.update(accuracy=result["accuracy"], test_loss=result["loss"])
        reporter.line(f"test: accuracy {result['accuracy']:.4f} loss {result['loss']:.4f} "
                      f"on {result['samples']} samples")
    if comm.rank == 0:
        save_model(os.path.join(out, "model.h5"), spec, params)
    reporter.record(**summary)
    reporter.line(f"done: {steps} steps in {seconds:.2f} s, {summary['samples_per_s']:,.0f} "
                  f"samples/s, final loss {loss:.4f}; model in {os.path.join(out, 'model.h5')}"
                  if first < steps else f"done: all {steps} steps were already taken; model in "
                  f"{os.path.join(out, 'model.h5')}")
    reporter.close()
    comm.Barrier()  # the model file exists before any rank returns
    return summary
