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

from .. import faults
from ..comm.agree import raise_together
from ..errors import UserError
from ..nn.io import save_model
from ..optim import learning_rate, make_optimizer
from .checkpoint import choose_checkpoint, save_checkpoint
from .environment import run_environment
from .evaluate import evaluate
from .inputs import NO_INPUTS, StepRecord, call_back
from .precision import make_precision
from .setup import (
    batch_loader,
    build_model,
    open_test_shard,
    open_train_shard,
    plan_steps,
    prepare_out,
    running,
    start_report,
    stop_early,
)
from .sharded_checkpoint import (
    choose_sharded,
    read_sharded,
    refuse_other_kind,
    save_sharded,
)
from .step import make_step
from .timeline import Timeline, trace_step


def run_data_parallel(cfg, comm, xp, inputs=NO_INPUTS, lock=None) -> dict:
    """Train data-parallel over `comm` as `cfg` (a Config) says; return the summary.

    inputs: a model object, this rank's arrays and callbacks (mpifed.train.run).
    lock: the RunLock that rank 0 takes on run.out before writing there (held by the caller).
    """
    data, optim, run, stage = cfg.data, cfg.optim, cfg.run, cfg.comm.shard
    dtype = np.dtype(cfg.model.dtype)
    shard, classes = open_train_shard(comm, data, dtype, inputs.data, cfg.model)
    if inputs.model is not None:  # the model's classes, unless the labels need more
        classes = max(classes, inputs.model.num_classes)
    whole = stage != "parameters"  # ZeRO-3: each rank draws only its chunk
    spec, params = raise_together(comm, lambda: build_model(
        cfg.model, run.seed, shard.info.input_shape, classes, xp, dtype, stage, whole=whole,
        ranks=comm.size, given=inputs.model))
    spec.accumulate = optim.accumulate  # micro-batches per step
    rows = optim.batch_size * optim.accumulate  # per rank per step
    per_epoch, total = plan_steps(optim, len(shard), comm)
    test = None
    if data.test:
        test = open_test_shard(comm, data, spec, dtype, inputs.test)
    env = run_environment(cfg, comm)
    out = prepare_out(cfg, comm, env, lock)
    optimizer = make_optimizer(optim, spec, dtype)
    precision = raise_together(comm, lambda: make_precision(cfg.model, optim, spec, dtype, xp))
    step_fn = make_step(spec, params, comm, cfg.comm, xp, dtype, precision)
    del params  # the step holds the model now (ZeRO-3: only this rank's chunk)
    first = resume_step(cfg, comm, step_fn, optimizer, xp)
    if first > total:  # same on every rank
        raise UserError(f"optim.steps: nothing to do, the checkpoint in {run.out!r} is at step "
                        f"{first}, past this run's {total} steps; raise optim.steps (or epochs), "
                        "or set run.resume = \"never\"")
    reporter = start_report(
        run.progress, out, comm.rank == 0, total, first,
        f"mpifed train: {comm.size} ranks, {spec.kind} {spec.sizes}, {shard.info.samples} "
        f"samples, global batch {rows * comm.size}, {total} steps ({per_epoch} "
        f"per epoch), backend {xp.__name__}"
        + (f", comm.shard {stage}" if stage != "none" else ""),
        "step")
    timeline = Timeline.open(run.timeline, comm, os.path.join(out, "timeline.json"))
    loader = batch_loader(data, rows, run.seed, shard, per_epoch, comm.rank, first,
                          xp, timeline)
    window = Window(rows * comm.size)
    start, loss, stopped = time.perf_counter(), math.nan, ""
    with running(loader, step_fn) as flag:
        for step in range(first, total):
            t_data = time.perf_counter()
            epoch, x, y = loader.get()
            t_compute, comm_before = time.perf_counter(), step_fn.comm_seconds
            lr = learning_rate(step, optim.lr, total, optim.schedule, optim.warmup,
                               optim.step_size, optim.gamma)
            loss = step_fn(x, y, optimizer, lr, step + 1, stop=flag.value)
            done = step + 1
            trace_step(timeline, done, t_data, t_compute, step_fn, comm_before)
            faults.inject("step", done, comm.rank)
            log = run.log_every > 0 and (done % run.log_every == 0 or done == total)
            rate, comm_share = window.tick(step_fn.comm_seconds, log)
            reporter.step(done, epoch, loss, lr, rate, comm_share, log)
            call_back(comm, inputs.callbacks, StepRecord(done, float(loss), float(lr)))
            if test is not None and run.eval_every and done % run.eval_every == 0:
                reporter.record(event="eval", step=done,
                                **evaluate(spec, model_source(step_fn), test, comm, xp))
            every = run.checkpoint_every
            if step_fn.stop_agreed or (every and done % every == 0 and done < total):
                write_checkpoint(cfg, comm, step_fn, optimizer, done, per_epoch)
            if step_fn.stop_agreed:
                stopped = flag.raised or "a signal on another rank"
                break
    step_fn.free()
    timeline.write(comm, os.path.join(out, "timeline.json"), env)
    if stopped:
        return stop_early(run.out, comm, reporter, done, stopped)
    memory = memory_report(comm, step_fn, optimizer)
    memory.update(exchange_report(comm, step_fn, total - first))
    memory.update(scaler_report(step_fn))
    return finish(cfg, comm, spec, model_source(step_fn), test, reporter, xp, (first, total),
                  (time.perf_counter() - start, step_fn.comm_seconds, loader.wait_seconds), loss,
                  memory, step_fn.allreduce_choice, env)


def model_source(step_fn):
    """The model to evaluate and write: flat parameters, or ZeRO-3's per-layer gatherer."""
    return step_fn.model_source()


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


def mpi_shape(comm) -> dict:
    """The MPI shape (rank count) a checkpoint is valid for."""
    return {"ranks": comm.size}


def resume_step(cfg, comm, step_fn, optimizer, xp) -> int:
    """Load the checkpoint run.resume points at into the step's parameters and the optimiser;
    return its step. Sharded steps read their part of a sharded checkpoint (any rank count)."""
    if step_fn.sharded:
        return resume_sharded(cfg, comm, step_fn, optimizer, xp)
    found = raise_together(comm, lambda: choose_unsharded(cfg, mpi_shape(comm))
                           if comm.rank == 0 else None)
    ranks = found.pop("compressor", None) if found is not None else None
    found = comm.bcast(found, root=0)
    if found is None:
        return 0
    step_fn.params[...] = xp.asarray(found["params"])
    load_scaler(step_fn, found["counters"])
    optimizer.load_state(on_device(found["state"], xp))
    own = comm.scatter(ranks, root=0) if comm.bcast(ranks is not None, root=0) else None
    if own:  # each rank its own error feedback; the same run, so the same compressor
        step_fn.compressor.load_state(on_device(own, xp))
    return int(found["counters"]["step"])


def load_scaler(step_fn, counters: dict) -> None:
    """Restore the loss scaler from a checkpoint's counters (mixed precision; the same on
    every rank). A checkpoint without one (written in fp32) leaves the scaler fresh."""
    scaler = step_fn.precision.scaler
    if scaler is not None and "loss_scale" in counters:
        scaler.load_state(counters["loss_scale"])


def scaler_report(step_fn) -> dict:
    """Return the summary's mixed-precision fields: loss_scale (the scale in use at the end)
    and skipped_steps (steps skipped for inf/NaN gradients, since the run began, resumes
    included); empty in fp32."""
    scaler = step_fn.precision.scaler
    if scaler is None:
        return {}
    return {"loss_scale": scaler.scale, "skipped_steps": scaler.skipped}


def on_device(state: dict, xp) -> dict:
    """Return `state` with its arrays moved to `xp` (scalars kept as they are)."""
    return {k: xp.asarray(v) if np.ndim(v) else v for k, v in state.items()}


def choose_unsharded(cfg, shape: dict) -> dict | None:
    """choose_checkpoint for steps, refusing a run.out that holds only sharded ones."""
    found = choose_checkpoint(cfg, "step", shape)
    if found is None and cfg.run.resume == "auto":
        refuse_other_kind(cfg, sharded=False)
    return found


def resume_sharded(cfg, comm, step_fn, optimizer, xp) -> int:
    """Load this rank's part of the sharded checkpoint run.resume points at; return its step."""
    found = raise_together(comm, lambda: choose_sharded(cfg) if comm.rank == 0 else None)
    found = comm.bcast(found, root=0)
    if found is None:
        return 0
    values, state = raise_together(comm, lambda: read_sharded(found, step_fn, xp))
    step_fn.load_shard(values)  # collective: ZeRO-1/2 re-gather the model
    if state:
        optimizer.load_state(state)
    load_scaler(step_fn, found["counters"])
    return int(found["counters"]["step"])


def write_checkpoint(cfg, comm, step_fn, optimizer, step: int, per_epoch: int) -> None:
    """Write the checkpoint of `step` (rank 0, or every rank its part when sharded); every rank
    waits until it is on disk.

    Every rank walks its shard in lockstep, so one (epoch, step in epoch) places every rank's
    stream; the permutations derive from (run.seed, epoch, rank), the only RNG state there is.
    """
    counters = {"step": step, "epoch": step // per_epoch, "step_in_epoch": step % per_epoch,
                "rng": {"seed": cfg.run.seed, "permutation": "(seed, epoch, rank)"}}
    scaler = step_fn.precision.scaler
    if scaler is not None:  # mixed precision: the loss scale and its clean-step count
        counters["loss_scale"] = scaler.state()
    if step_fn.sharded:
        save_sharded(cfg, comm, step_fn, optimizer, step, counters)
        return
    compressed = compressor_states(comm, step_fn)
    if comm.rank == 0:
        save_checkpoint(cfg.run.out, "step", step, step_fn.params, optimizer.state(),
                        counters, cfg, mpi_shape(comm), cfg.run.keep_checkpoints, compressed)
    comm.Barrier()


def compressor_states(comm, step_fn) -> list[dict] | None:
    """Gather every rank's compressor state (host arrays) on rank 0, in rank order; None
    elsewhere, and where no rank has any ("none", fp16, bf16: the file stays as it was)."""
    if step_fn.compressor is None:
        return None  # the same on every rank: the step's class decides
    own = {k: np.asarray(v.get() if hasattr(v, "get") else v)
           for k, v in step_fn.compressor.state().items()}
    every = comm.gather(own, root=0)
    return every if every and any(every) else None


def memory_report(comm, step_fn, optimizer) -> dict:
    """Return each rank's bytes (lists in rank order, on every rank): param_bytes, grad_bytes,
    optimizer_state_bytes (the optimiser's arrays) and peak_rss_bytes (the process's peak)."""
    own = dict(step_fn.memory_bytes(), optimizer_state_bytes=state_bytes(optimizer),
               peak_rss_bytes=peak_rss_bytes(),
               activation_bytes=int(getattr(step_fn.spec, "activation_bytes", 0)))
    every = comm.allgather(own)
    return {key: [r[key] for r in every] for key in own}


def exchange_report(comm, step_fn, steps: int) -> dict:
    """Return bytes_sent_per_step (each rank's mean over the `steps` this run took, in rank
    order) and compression_ratio (bytes uncompressed over bytes sent, all ranks; 1.0 when
    nothing was sent)."""
    every = comm.allgather(step_fn.exchange_bytes())
    sent, plain = sum(s for s, _ in every), sum(u for _, u in every)
    return {"bytes_sent_per_step": [s / steps if steps else 0.0 for s, _ in every],
            "compression_ratio": plain / sent if sent else 1.0}


def state_bytes(optimizer) -> int:
    """Return the bytes of the optimiser's state arrays on this rank."""
    return int(sum(v.nbytes for v in optimizer.state().values() if np.ndim(v)))


def peak_rss_bytes() -> int:
    """Return this process's peak resident set size in bytes (Linux reports KiB)."""
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def write_model(path: str, spec, params, comm) -> None:
    """Write model.h5 on rank 0. ZeRO-3 (`params` a LayerGather): every rank gathers layer by
    layer as rank 0 writes each into the file, so the whole model is never in memory; a
    failure on rank 0 is raised on every rank once the gathers are through."""
    if not callable(params):
        if comm.rank == 0:
            save_model(path, spec, params)
        return

    def write():
        if comm.rank != 0:
            params.walk()
            return
        before = params.calls
        try:
            save_model(path, spec, params, params.step.dtype)
        except OSError as err:
            for layer in params.layers[params.calls - before:]:  # the others wait in gathers
                params(*layer)
            raise UserError(f"run.out: cannot write {path!r} ({err}); free space or pick "
                            "another run.out") from None
    raise_together(comm, write)


def finish(cfg, comm, spec, params, test, reporter, xp, span, timings, loss,
           memory=None, choice=None, env=None) -> dict:
    """Evaluate, write the model and the summary; return the summary.

    span: (first, total) steps; timings: (seconds, in all-reduces, waiting for data) that this
    process spent on steps first..total-1; choice: the step's allreduce_choice; env:
    run_environment's fields.
    """
    (first, steps), (seconds, comm_seconds, data_seconds) = span, timings
    out, per_step = cfg.run.out, cfg.optim.batch_size * cfg.optim.accumulate * comm.size
    summary = {"event": "summary", "steps": steps, "samples": steps * per_step,
               "seconds": seconds, "loss": loss if math.isfinite(loss) else None,
               "comm_seconds": comm_seconds,
               "data_wait_seconds": data_seconds,
               "samples_per_s": (steps - first) * per_step / max(seconds, 1e-9)}
    if spec.kind == "gpt":  # a sample is a window of block_size tokens
        summary["tokens_per_s"] = summary["samples_per_s"] * spec.input_shape[0]
    if first:
        summary["resumed_from"] = first
    summary.update(shard=cfg.comm.shard, **(memory or {}))
    summary.update({} if choice is None else {"allreduce_choice": choice})
    summary.update(env or {})
    if test is not None:
        result = evaluate(spec, params, test, comm, xp)
        reporter.record(event="eval", step=steps, **result)
        summary.update(accuracy=result["accuracy"], test_loss=result["loss"])
        if "perplexity" in result:
            summary["perplexity"] = result["perplexity"]
        reporter.line(f"test: accuracy {result['accuracy']:.4f} loss {result['loss']:.4f} "
                      f"on {result['samples']} samples")
    write_model(os.path.join(out, "model.h5"), spec, params, comm)
    reporter.record(**summary)
    reporter.line(f"done: {steps} steps in {seconds:.2f} s, {summary['samples_per_s']:,.0f} "
                  f"samples/s, final loss {loss:.4f}; model in {os.path.join(out, 'model.h5')}"
                  if first < steps else f"done: all {steps} steps were already taken; model in "
                  f"{os.path.join(out, 'model.h5')}")
    reporter.close()
    comm.Barrier()  # the model file exists before any rank returns
    return summary
