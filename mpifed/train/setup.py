"""What both training loops set up before their first step: the array backend and BLAS threads,
the checked data shards, the model, the step plan, the output folder, the batch loader, and the
report of an early stop. The data-parallel loop (`data_parallel.py`) and the federated round loop
(`federated.py`) sit on top of this module; neither imports the other.
"""

from __future__ import annotations

import glob
import os
import re
import time
from contextlib import contextmanager
from math import prod

import numpy as np
from mpi4py import MPI

from ..comm.agree import raise_together
from ..comm.backend import select_device
from ..comm.nccl import nccl_unavailable
from ..comm.scalars import allgather_ints, allreduce_int
from ..comm.topology import ranks_per_node
from ..config import to_toml
from ..data.atomic import DiskFull, atomic_path
from ..data.memory import ARRAYS, MemoryShard, check_arrays, padded_shape
from ..data.shards import Shard, describe, shard_bounds
from ..data.stream import Prefetcher, shard_stream
from ..errors import UserError, check_memory
from ..hostmem import keep_freed_memory
from ..log import get_logger
from ..nn.io import load_model
from ..nn.spec import fit_to_data, model_from_config
from ..xp import backend_module, device_copier
from .checkpoint import SET_ASIDE_STAMP, checkpoint_dir
from .environment import config_header
from .report import Reporter
from .signals import StopFlag
from .threads import ThreadChoice, choose_threads

log = get_logger(__name__)


def array_backend(settings, comm):
    """Return the array module that `settings` (the CommConfig) names, chosen collectively and
    bound to this rank's GPU; refuse comm.allreduce = "nccl" where NCCL cannot run, on every
    rank with one message."""
    def choose():
        try:
            module = backend_module(settings.backend)
        except ValueError as err:
            raise UserError(f"comm.backend: {err}") from None
        return module
    xp = raise_together(comm, choose)
    if xp is not np:
        select_device(comm)
    else:
        keep_freed_memory()  # a step's arrays reuse their pages instead of faulting anew
    if settings.allreduce == "nccl":
        if xp is np:
            raise UserError('comm.allreduce = "nccl" needs GPU arrays, but the backend is NumPy '
                            '(CuPy or a GPU is missing, or comm.backend = "numpy"); use '
                            'comm.allreduce = "auto", "ring", "mpi" or "hierarchical"')
        reason = nccl_unavailable(comm)  # the same answer on every rank
        if reason:
            raise UserError(f'comm.allreduce = "nccl": {reason}')
    return xp


def blas_threads_per_rank(comm) -> int:
    """Return this rank's BLAS thread count (`thread_choice(comm).threads`)."""
    return thread_choice(comm).threads


def thread_choice(comm) -> ThreadChoice:
    """Return this rank's BLAS thread count and why (threads.py decides; collective the first
    time, for the ranks on this node)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return choose_threads(os.environ, cores or 1, ranks_per_node(comm))


def open_checked_shard(comm, path: str, x: str, y: str, dtype, key: str,
                       features: int | None = None) -> tuple[Shard, int]:
    """Open this rank's shard of `path` after checking it on all ranks; return (shard, classes).

    Checks (collectively, so every rank stops together): the file and its datasets, the feature
    count against `features`, finite values, non-negative labels. Classes come from the file's
    `num_classes` attribute, else max(y)+1 over all shards.
    """
    if path == ARRAYS:  # the same on every rank: no rank raises alone
        raise UserError(f"{key} = {ARRAYS!r}: this configuration was written by a run given "
                        "arrays from Python (mpifed.train.run(config, data=(x, y))); give the "
                        f"arrays again there, or set {key} to an HDF5 file (mpifed data "
                        "from-numpy X.npy Y.npy OUT.h5 writes one)")
    info = raise_together(comm, lambda: describe(path, x, y, key))
    if features is not None and info.features != features:
        raise UserError(f"{key}: {path!r} has {info.features} features, the model expects "
                        f"{features}")
    start, stop = shard_bounds(info.samples, comm.size, comm.rank)
    log.debug("%s: rows [%d, %d) of %r on this rank", key, start, stop, path)
    shard = raise_together(comm, lambda: Shard(info, start, stop, dtype))

    def check_values():
        if not shard.all_finite():
            raise UserError(f"{key}: {path!r} has NaN or Inf in {x!r} among rows "
                            f"[{start}, {stop}); clean the data")
        low, _ = shard.label_range()
        if low < 0:
            raise UserError(f"{key}: {path!r} has a negative label ({low}) in {y!r}")
    raise_together(comm, check_values)
    # int64 buffers, never pickles: comm may be a federation's world
    top = allreduce_int(comm, shard.label_range()[1], MPI.MAX)
    classes = info.num_classes if info.num_classes is not None else top + 1
    bottom = allreduce_int(comm, shard.label_range()[0] if len(shard) else top, MPI.MIN)
    if classes < 2 or (key == "data.train" and bottom == top):
        raise UserError(f"{key}: every label in {y!r} of {path!r} is {top}; a classifier needs "
                        "at least two classes")

    def check_classes():
        if shard.label_range()[1] >= classes:
            raise UserError(f"{key}: label {shard.label_range()[1]} in {path!r} is out of range "
                            f"for num_classes={classes} (labels must be 0..{classes - 1})")
    raise_together(comm, check_classes)
    return shard, classes


def open_test_shard(comm, data, spec, dtype, arrays=None) -> Shard | MemoryShard:
    """Open this rank's shard of data.test (`data`: the DataConfig), or of `arrays` (this
    rank's (x, y) given to mpifed.train.run as `test`), checked against the model
    (collective)."""
    if spec.kind == "gpt" and arrays is None:
        shard, vocab = open_token_shard(comm, data.test, spec.input_shape[0], dtype, "data.test")
        if vocab > spec.num_classes:
            raise UserError(f"data.test: {data.test!r} has vocab_size {vocab}, the model "
                            f"{spec.num_classes}; use token files of one vocabulary")
        return shard
    if arrays is not None:
        shard, classes = open_memory_shard(comm, arrays, dtype, "test", features=spec.features)
        where, fix = "test", "pass the model's classes as num_classes"
    else:
        shard, classes = open_checked_shard(comm, data.test, data.x, data.y, dtype,
                                            "data.test", features=spec.features)
        where = f"data.test: {data.test!r}"
        fix = "give the training file a num_classes attribute that covers both"
    if classes > spec.num_classes:
        raise UserError(f"{where} has labels up to {classes - 1}, but the model knows "
                        f"{spec.num_classes} classes (0..{spec.num_classes - 1}); {fix}")
    return shard


def open_token_shard(comm, path: str, block_size: int, dtype, key: str):
    """Open this rank's windows of a token file (data/tokens.py), checked on all ranks; return
    (shard, vocab_size). Token ids must lie in [0, vocab_size)."""
    from ..data.tokens import TokenShard, describe_tokens

    info = raise_together(comm, lambda: describe_tokens(path, block_size, key))
    start, stop = shard_bounds(info.samples, comm.size, comm.rank)
    shard = raise_together(comm, lambda: TokenShard(info, start, stop, dtype))

    def check_ids():
        low, high = shard.label_range()
        if len(shard) and (low < 0 or high >= info.vocab_size):
            raise UserError(f"{key}: {path!r} has token id {high if high >= info.vocab_size else low}"
                            f" outside [0, vocab_size = {info.vocab_size})")
    raise_together(comm, check_ids)
    return shard, info.vocab_size


def open_train_shard(comm, data, dtype, arrays=None, model=None):
    """Open this rank's training shard, of data.train (`data`: the DataConfig) or of `arrays`
    (this rank's (x, y) given to mpifed.train.run as `data`); return (shard, classes).
    model: the ModelConfig; a GPT reads windows of a token file (classes: its vocab_size)."""
    if model is not None and model.kind == "gpt" and arrays is None:
        return open_token_shard(comm, data.train, model.block_size, dtype, "data.train")
    if arrays is not None:
        return open_memory_shard(comm, arrays, dtype, "data")
    return open_checked_shard(comm, data.train, data.x, data.y, dtype, "data.train")


def open_memory_shard(comm, arrays, dtype, key: str,
                      features: int | None = None) -> tuple[MemoryShard, int]:
    """Hold this rank's `arrays` (x, y) as its shard, checked on all ranks; return (shard,
    classes).

    Checks (collectively): each rank's arrays (check_arrays), the same sample shape on every
    rank, the feature count against `features`. Classes: max(y)+1 over all ranks (an int64
    Allreduce). Rows are numbered in rank order, as if the shards were one file.
    """
    x, y = raise_together(comm, lambda: check_arrays(arrays, key))
    every = allgather_ints(comm, (len(y), *padded_shape(x)))
    shapes = [row[2:2 + row[1]] for row in every]
    if any(shape != shapes[0] for shape in shapes):
        odd = next(r for r, shape in enumerate(shapes) if shape != shapes[0])
        raise UserError(f"{key}: rank {odd}'s x has samples of shape {shapes[odd]}, rank 0's "
                        f"{shapes[0]}; every rank's x must have the same sample shape")
    if features is not None and prod(shapes[0]) != features:
        raise UserError(f"{key}: x has {prod(shapes[0])} features per row, the model expects "
                        f"{features}")
    counts = [row[0] for row in every]
    shard = MemoryShard(x, y, sum(counts[:comm.rank]), sum(counts), dtype)
    log.debug("%s: rows [%d, %d) of %d given as arrays on this rank", key, shard.start,
              shard.stop, sum(counts))
    top = allreduce_int(comm, shard.label_range()[1], MPI.MAX)
    bottom = allreduce_int(comm, shard.label_range()[0] if len(shard) else top, MPI.MIN)
    if top + 1 < 2 or (key == "data" and bottom == top):
        raise UserError(f"{key}: every label in y is {top}; a classifier needs at least two "
                        "classes")
    return shard, top + 1


def build_model(model, seed: int, input_shape, classes: int, xp, dtype, stage: str = "none",
                whole: bool = True, ranks: int = 1, given=None):
    """Return (model, flat params) from model.init, or initialised from `seed` (run.seed).

    given: a Sequential to train instead of the one [model] describes (mpifed.train.run's
    `model`), checked against the data (rebuilt for its input shape when that differs).

    model: the ModelConfig; stage: comm.shard, for the memory check.

    whole=False (ZeRO-3): without model.init, params is None and the sharded step draws only
    its chunk from spec.seed (`Sequential.init_range`), so no rank ever holds the whole model.
    ranks: how many ranks share the model's state under comm.shard (the memory check is per
    rank for that stage).

    input_shape: one sample's shape in the training data, e.g. (1, 8, 8) or (64,) (an int is a
    flat feature count).
    """
    shape = (input_shape,) if isinstance(input_shape, int) else tuple(input_shape)
    if model.init:
        spec, host = load_model(model.init, dtype)
        fit_to_data(spec, shape, classes, "model.init")
        check_init_matches(model, spec, shape, classes)
        params = xp.asarray(host)
    else:
        if given is not None:
            fit_to_data(given, shape, classes, "model")
            spec = given
        else:
            spec = model_from_config(model, shape, classes)
        check_memory(model_bytes(spec, dtype, stage, ranks, whole),
                     f"model {spec.kind} {spec.sizes}"
                     + (f" with comm.shard = {stage!r} on {ranks} ranks, per rank,"
                        if stage != "none" else ""),
                     "use a smaller model (model.hidden or model.layers)"
                     + ("" if stage == "parameters" else
                        ', or shard it over the ranks (comm.shard = "parameters")'))
        params = spec.init(seed, xp, dtype) if whole else None
    spec.seed = seed  # dropout's masks: (seed, step, rank)
    return spec, params


def model_bytes(spec, dtype, stage: str, ranks: int, whole: bool = True) -> int:
    """Return the bytes of model state per rank at comm.shard `stage` on `ranks` ranks
    (parameters, gradients, two optimiser states, a checkpoint's host copy; plus the whole
    model drawn at the start where `whole` and the stage shards the parameters)."""
    from .sharded_step import bytes_per_rank

    n, itemsize = spec.layout(dtype).size, np.dtype(dtype).itemsize
    widest = max([b - a for a, b in (spec.layer_range(i, dtype)
                                     for i in range(len(spec.layers)))] or [0])
    held = bytes_per_rank(n, widest, itemsize, stage, ranks)
    return held + (n * itemsize if whole and stage == "parameters" else 0)


def check_init_matches(model, spec, shape, classes: int) -> None:
    """Refuse a model.init file whose model differs from [model] (the ModelConfig):
    config.toml must describe the model that is trained."""
    if model.factory:
        return  # the factory's model is whatever the file holds; its name is in the file
    if spec.kind != model.kind or list(spec.hidden) != list(model.hidden):
        raise UserError(f"model.init: {model.init!r} holds kind = {spec.kind!r}, hidden = "
                        f"{list(spec.hidden)}, but [model] says kind = {model.kind!r}, "
                        f"hidden = {list(model.hidden)}; set [model] to match the file")
    if spec.kind not in ("softmax", "mlp") and model_from_config(model, shape, classes) != spec:
        raise UserError(f"model.init: {model.init!r} holds {spec.kind} {spec.sizes}, which "
                        "differs from what [model] describes; set [model] to match the file")


def plan_steps(optim, shard_len: int, comm) -> tuple[int, int]:
    """Return (steps_per_epoch, total_steps) for `optim` (the OptimConfig): the smallest shard
    decides for every rank."""
    batch = optim.batch_size * getattr(optim, "accumulate", 1)
    smallest = allreduce_int(comm, shard_len, MPI.MIN)
    per_epoch = smallest // batch
    if per_epoch == 0:
        raise UserError(f"optim.batch_size: {batch} rows per rank is more than the smallest "
                        f"shard ({smallest} rows on {comm.size} ranks); lower optim.batch_size "
                        "or use fewer ranks")
    steps = optim.steps or optim.epochs * per_epoch
    return per_epoch, steps


def prepare_out(cfg, comm, env: dict | None = None, lock=None) -> str:
    """Create run.out on rank 0 and write the resolved Config there, under a header of `env`
    (run_environment's fields, TOML comments); return the folder.

    lock: a RunLock (run_lock.py) that rank 0 takes on the folder first, before it moves or
    writes anything there; a folder another run holds is refused on every rank."""
    out = cfg.run.out

    def make():
        if comm.rank == 0:
            try:
                if lock is not None:
                    lock.take(out)
                with naming_moved_files(time.time()):
                    set_aside_finished_run(out)
                    os.makedirs(out, exist_ok=True)
                    with atomic_path(os.path.join(out, "config.toml")) as tmp, \
                            open(tmp, "w") as fh:
                        fh.write((config_header(env) if env else "") + to_toml(cfg))
            except OSError as err:
                raise UserError(f"run.out: cannot write to {out!r} ({err.strerror})") from None
    raise_together(comm, make)
    return out


# What set_aside_finished_run moves from OUT to OUT/previous-<time>/.
FINISHED_RUN_FILES = ("model.h5", "config.toml", "metrics.jsonl")


def set_aside_finished_run(out: str) -> None:
    """Move an earlier run's model.h5 with its config.toml and metrics.jsonl to
    OUT/previous-<time>/, so that a new run's files never pose as the description of that model
    (whether the new run finishes or fails)."""
    model = os.path.join(out, "model.h5")
    if not os.path.isfile(model):
        return
    stamp = time.strftime(SET_ASIDE_STAMP)
    target, n = os.path.join(out, f"previous-{stamp}"), 1
    while os.path.exists(target):
        target, n = os.path.join(out, f"previous-{stamp}-{n}"), n + 1
    os.makedirs(target)
    for name in FINISHED_RUN_FILES:
        if os.path.exists(os.path.join(out, name)):
            os.replace(os.path.join(out, name), os.path.join(target, name))
    log.info("moved the earlier run's model.h5, config.toml and metrics.jsonl from %r to %r",
             out, target)


def moved_since(path: str, since: float) -> str | None:
    """Say where a run that started at `since` (time.time()) moved the earlier copy of `path`,
    or return None if it moved none: OUT/previous-<time>/ for OUT's model.h5, config.toml and
    metrics.jsonl, OUT/checkpoints.before-<time>/ for anything in OUT/checkpoints/."""
    parts = os.path.normpath(path).split(os.sep)
    name = parts[-1]
    if "checkpoints" in parts[:-1]:
        folder = os.sep.join(parts[:len(parts) - 1 - parts[-2::-1].index("checkpoints")])
        prefix, what = f"{folder}.before-", "the earlier checkpoints are in {!r}"
    elif name in FINISHED_RUN_FILES:
        prefix = os.path.join(os.path.dirname(path), "previous-")
        what = f"the earlier run's {name} is in {{!r}}"
    else:
        return None
    earliest = time.strftime(SET_ASIDE_STAMP, time.localtime(since))
    moved = [p for p in glob.glob(glob.escape(prefix) + "*")
             if (match := _SET_ASIDE.fullmatch(p[len(prefix):])) and match[1] >= earliest
             and os.path.isdir(p) and (prefix.endswith(".before-")
                                       or os.path.exists(os.path.join(p, name)))]
    if not moved:
        return None
    newest = max(moved, key=lambda p: _set_aside_order(p[len(prefix):]))
    return what.format(newest)


_SET_ASIDE = re.compile(r"(\d{8}-\d{6})(?:-(\d+))?")


def _set_aside_order(suffix: str) -> tuple[str, int]:
    """Sort <time>[-n] suffixes: by time, then n (the second folder of the same second)."""
    match = _SET_ASIDE.fullmatch(suffix)
    return match[1], int(match[2] or 0)


@contextmanager
def naming_moved_files(since: float):
    """Turn a DiskFull on a path whose earlier copy this run (started at `since`) moved away
    into one that says where that copy is, so that no message points at an empty path."""
    try:
        yield
    except DiskFull as err:
        earlier = None if err.existed or err.earlier else moved_since(err.path, since)
        if earlier is None:
            raise
        raise DiskFull(err.path, err.existed, earlier) from None


def batch_loader(data, batch_size: int, seed: int, shard, per_epoch: int, rank: int,
                 steps_done: int, xp, timeline=None) -> Prefetcher:
    """Return the prefetching loader of this rank's stream, placed after `steps_done` steps.

    data: the DataConfig (shuffle settings); batch_size: rows per rank; seed: run.seed.
    rank: this rank's place in the communicator that sharded the data (it seeds the shuffle).
    timeline: where a streamed shard's block reads are traced (optional).
    """
    stream = shard_stream(shard, batch_size, per_epoch, seed,
                          rank, data.shuffle, epoch=steps_done // per_epoch,
                          step=steps_done % per_epoch, block=data.shuffle_block,
                          buffer=data.shuffle_buffer, timeline=timeline)
    return Prefetcher(shard, stream, device_copier(xp))


@contextmanager
def running(loader, step_fn):
    """Run a training loop's body under a StopFlag (yielded); close `loader` and `step_fn`
    afterwards, whether the body ended, broke off or raised."""
    try:
        with StopFlag() as flag:
            yield flag
    finally:
        loader.close()
        step_fn.close()


def stop_early(out: str, comm, reporter, step: int, why: str) -> dict:
    """Report a stop on request (preemption): the checkpoint of `step` is in run.out `out`."""
    reporter.record(event="stopped", step=step, reason=why)
    reporter.line(f"stopped by {why} after step {step}; checkpoint in "
                  f"{checkpoint_dir(out)}; run the same command to resume")
    reporter.close()
    comm.Barrier()
    return {"event": "stopped", "step": step, "reason": why}


def start_report(progress: str, out: str, is_root: bool, total: int, first: int, banner: str,
                 unit: str) -> Reporter:
    """Open the run's reporter (`progress`: run.progress), print its banner, and record a
    resumption after `first` steps or rounds (`unit`: "step" or "round")."""
    reporter = Reporter(out, is_root, total, progress, append=first > 0)
    resumed = f", resumed at step {first}" if unit == "step" else f", resumed after round {first}"
    reporter.line(banner + (resumed if first else ""))
    if first:
        reporter.record(event="resumed", **{unit: first})
    return reporter
