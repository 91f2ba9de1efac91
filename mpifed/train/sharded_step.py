"""The data-parallel step with the model state sharded over the ranks (ZeRO, Rajbhandari et al.).

The flat buffer of n parameters plus two slots (the rank's loss and stop request, as in
DataParallelStep) is cut into chunk_bounds(n + 2, p); rank r owns chunk r. Stages
(`[comm] shard`):

- "optimizer" (ZeRO-1): whole gradients, reduce-scattered (mean); the unchanged optimiser updates
  the owned slice of the parameters, so its state covers that slice only; the parameters are
  all-gathered. Same bytes on the wire as one all-reduce.
- "gradients" (ZeRO-2): no whole gradient buffer: each layer's gradients go into one of two
  buckets of the largest layer's size, reduce-scattered as soon as final (on the communication
  thread with comm.overlap) and only this rank's part kept. With optim.accumulate = k, each
  micro-batch's gradients are reduce-scattered in turn and this rank's parts summed, then
  divided by k (DeepSpeed's way: k exchanges a step, no whole gradient kept).
- "parameters" (ZeRO-3): between steps each rank holds only its chunk of the parameters; each
  layer is all-gathered into one of two buffers before its forward and again before its backward
  (the next layer's gather started on the communication thread while this layer computes, with
  comm.overlap), then dropped. The model is never whole on any rank, not even at the start
  (`Sequential.init_range`), except when it is written out (model.h5, evaluation).

The layers come from `Sequential.layer_range`: the model asks for one layer's parameter and
gradient views at a time through providers (`Sequential.loss_and_grad`), so nn/ knows nothing of
MPI. Batch norm's running statistics live in the flat buffer: their backward writes their new
values as "gradients", which are averaged like any other, then moved into the parameters on the
owner's chunk, never trained (as `Sequential.take_buffers` does unsharded).
"""

from __future__ import annotations

import abc
import dataclasses
import time

import numpy as np
from mpi4py import MPI

from ..choices import STAGES  # comm.shard's names; STEPS serves exactly these
from ..comm import allgather, allreduce, reduce_scatter
from ..comm.checks import check_same_signature
from ..comm.ring import chunk_bounds
from ..comm.stall import StallWatch
from ..errors import UserError
from ..nn.layers import Context
from ..optim.clip import clip_grad_norm
from ..xp import device_thread_pool, record_event, to_host, wait_event
from .precision import FULL
from .step import DataParallelStep, Step, diverged


def part_bounds(lo: int, hi: int, bounds: list) -> list[tuple[int, int]]:
    """Return each rank's part of [lo, hi) as (start, stop) relative to lo, in rank order."""
    width = hi - lo
    return [(min(max(a - lo, 0), width), min(max(b - lo, 0), width)) for a, b in bounds]


def clipped(ranges: list, lo: int, hi: int) -> list[tuple[int, int]]:
    """Return the parts of `ranges` inside [lo, hi), relative to lo."""
    return [(max(a, lo) - lo, min(b, hi) - lo) for a, b in ranges if min(b, hi) > max(a, lo)]


class ShardedStep(Step):
    """What the ZeRO stages share: a data-parallel step over `comm` whose optimiser state, and
    more per stage, is cut into the ranks' chunks (see module). Not built itself: the registry
    builds one of its stages, which differ only in the methods they override.

    Same call as DataParallelStep. params: the whole flat model (every rank the same), or None
    for ZeRO-3, where each rank then draws only its chunk from spec.seed (`dtype` says the
    parameters' dtype). Here the parameters are whole on every rank (ZeRO-1 and 2): `weights`
    holds them and the two slots, `params` is its first n, `shard` this rank's chunk of it.

    For sharded checkpoints (sharded_checkpoint.py): `n`, `dtype`, `bounds` (every rank's
    chunk), `lo`, `n_own`, `shard` and `load_shard`.
    """

    sharded = True

    def __init__(self, spec, params, comm, algorithm: str, xp, overlap: bool, *,
                 stall_timeout: float, dtype=None, compressor=None, precision=None):
        if compressor is not None and compressor.name != "none":
            raise UserError(f"comm.compression = \"{compressor.name}\" with a ZeRO stage "
                            "(comm.shard): the stages exchange gradients with their own "
                            "reduce-scatter, which compression is not wired into; set "
                            "comm.shard = \"none\" or comm.compression = \"none\"")
        self.spec, self.comm, self.xp = spec, comm, xp
        self.precision = precision or FULL
        self._exchanged = 0  # bytes this rank sent reduce-scattering gradients (ring-equivalent)
        self.algorithm = "mpi" if algorithm == "nccl" else algorithm  # no NCCL halves yet
        self.dtype = np.dtype(params.dtype if params is not None else dtype)
        self.n = spec.layout(self.dtype).size
        self.bounds = chunk_bounds(self.n + 2, comm.size)
        self.lo, self.hi = self.bounds[comm.rank]
        check_same_signature(comm, self.n + 2, self.dtype)  # once; steps skip it
        # Trained layers: (index, lo, hi); the last one carries the two slots in its reduction.
        self.layers = [(i, *spec.layer_range(i, self.dtype)) for i in range(len(spec.layers))]
        self.layers = [(i, lo, hi) for i, lo, hi in self.layers if hi > lo]
        self.buffer_parts = clipped(spec.buffer_ranges(self.dtype), self.lo, self.lo + self.n_own)
        widest = max(hi - lo for _, lo, hi in self.layers) + 2
        self._make_params(params, widest)
        self._make_grads(widest)
        self.stop_agreed = False
        self.comm_seconds, self._step_number = 0.0, 0
        self._spans = []  # this step's collectives as (start, end) perf_counter seconds
        self.watch = StallWatch(comm, stall_timeout)
        self._pool = device_thread_pool(xp, "mpifed-comm") if overlap and comm.size > 1 else None

    @staticmethod
    def chunk(n: int, ranks: int) -> int:
        """Return the largest chunk of n parameters and the two slots on `ranks` ranks."""
        return -(-(n + 2) // max(ranks, 1))

    @property
    def n_own(self) -> int:
        """How many of this rank's chunk are parameters (the rest: the loss and stop slots)."""
        return max(0, min(self.hi, self.n) - self.lo)

    # --- what the stages hold ---------------------------------------------------------------

    def _make_params(self, params, widest: int) -> None:
        """Hold the whole parameters and the two slots; `shard` is this rank's chunk of them."""
        n, lo, hi = self.n, self.lo, self.hi
        self.weights = self.xp.zeros(n + 2, dtype=self.dtype)
        self.weights[:n] = params
        self.params = self.weights[:n]
        self.shard = self.weights[lo:hi]

    @abc.abstractmethod
    def _make_grads(self, widest: int) -> None:
        """Allocate the gradient buffers; `grad_shard` (hi - lo) receives this rank's part."""

    def _param_buffers(self) -> list:
        """The arrays that hold parameters on this rank (for memory_bytes)."""
        return [self.weights]

    @abc.abstractmethod
    def _grad_buffers(self) -> list:
        """The arrays that hold gradients on this rank (for memory_bytes)."""

    def exchange_bytes(self) -> tuple[int, int]:
        """Return (bytes sent, the same uncompressed) reduce-scattering gradients so far; the
        parameters' all-gathers are not gradient exchange."""
        return self._exchanged, self._exchanged

    def memory_bytes(self) -> dict:
        """Return the bytes this rank holds for parameters and gradients (buffers and
        half-precision copies included)."""
        half = self.precision.memory_bytes()
        return {"param_bytes": int(sum(a.nbytes for a in self._param_buffers()))
                + half["param_bytes"],
                "grad_bytes": int(sum(a.nbytes for a in self._grad_buffers()))
                + half["grad_bytes"]}

    # --- communication -------------------------------------------------------------------

    def _timed(self, after, fn, *args):
        """Run a collective once event `after` has happened; return (seconds, done event).
        Its span is kept for the timeline, from whichever thread ran it."""
        wait_event(after)
        start = time.perf_counter()
        self.watch.arm(self._step_number)
        fn(*args)
        self.watch.disarm()
        end = time.perf_counter()
        self._spans.append((start, end))
        return end - start, record_event(self.xp)

    def _run(self, fn, *args):
        """Run `fn` now, or on the communication thread with overlap; return a waitable."""
        if self._pool is not None:
            return self._pool.submit(self._timed, record_event(self.xp), fn, *args)
        self.comm_seconds += self._timed(None, fn, *args)[0]
        return None

    def _wait(self, future) -> None:
        """Wait for a collective started by `_run` (host and device); count the time blocked."""
        if future is not None:
            start = time.perf_counter()
            _, done = future.result()
            wait_event(done)
            self.comm_seconds += time.perf_counter() - start

    def _sum_over_ranks(self, buf):
        """Sync batch norm's reducer, queued behind the collectives already started."""
        def reduce():
            return allreduce(buf, self.comm, "sum", "mpi", check=False)
        if self._pool is None:
            return reduce()
        self._pool.submit(self._timed, record_event(self.xp), reduce).result()
        return buf

    def _scatter(self, bucket, lo: int, hi: int) -> None:
        """Reduce-scatter (mean) the gradients [lo, hi) held in `bucket`; keep this rank's part."""
        parts = part_bounds(lo, hi, self.bounds)
        own = reduce_scatter(bucket[:hi - lo], self.comm, "mean", self.algorithm, check=False,
                             bounds=parts)
        if self.comm.size > 1:  # the ring sends every part but this rank's
            a, b = parts[self.comm.rank]
            self._exchanged += (hi - lo - (b - a)) * bucket.itemsize
        self._keep(own, lo, hi)

    @abc.abstractmethod
    def _keep(self, own, lo: int, hi: int) -> None:
        """Put `own`, this rank's reduced part of the gradients [lo, hi), into `grad_shard`."""

    def _gather(self, out, lo: int, hi: int) -> None:
        """All-gather parameters [lo, hi) into `out` from the owners' shards."""
        a, b = max(lo, self.lo), min(hi, self.hi)
        if b > a:
            out[a - lo:b - lo] = self.shard[a - self.lo:b - self.lo]
        allgather(out[:hi - lo], self.comm, self.algorithm, check=False,
                  bounds=part_bounds(lo, hi, self.bounds))

    # --- the step --------------------------------------------------------------------------

    @abc.abstractmethod
    def _backward(self, x, y, ctx, stop: float) -> None:
        """Compute this rank's gradients with the loss and stop slots, and leave their mean
        over the ranks, this rank's part, in `grad_shard`."""

    def _context(self, step_number: int) -> Context:
        return Context(train=True, seed=getattr(self.spec, "seed", 0), step=step_number,
                       rank=self.comm.rank,
                       reduce=self._sum_over_ranks if self.comm.size > 1 else None)

    def __call__(self, x, y, optimizer, lr: float, step_number: int, anchor=None, mu=0.0,
                 stop: float = 0.0) -> float:
        """Take one step on the batch (x, y); return the global mean loss (see `Step`).

        anchor: FedProx's anchor, the whole flat model or `anchor()`'s (its owned slice is
        used).
        """
        self._step_number, self._spans = step_number, []
        self._backward(x, y, self._context(step_number), stop)
        self.skipped = self.precision.skip_step(self.comm)  # agreed over every rank and shard
        if not self.skipped:
            self._update(optimizer, lr, anchor, mu)
        compute_end = time.perf_counter()  # the update is the step's last computation
        loss, stop_mean = self._share_slots()
        # host arrays: the spans are where the collectives ran; on a GPU the host marks
        # would not time the device's work, and the step's comm time is drawn at its end
        self._note_spans(self._spans, compute_end if self.xp is np else None)
        self.stop_agreed = stop_mean > 0
        diverged(loss, step_number, self.precision)
        return loss

    def _update(self, optimizer, lr: float, anchor, mu) -> None:
        """The optimiser's step on this rank's chunk; the running statistics moved in."""
        own = self.n_own
        grads, params = self.grad_shard[:own], self.shard[:own]
        kept = self._take_buffers(grads)  # running statistics, averaged: not trained
        if anchor is not None and mu:
            grads += mu * (params - self._own_anchor(anchor))
            self._take_buffers(grads)
        if getattr(optimizer, "grad_clip", 0):  # optim.grad_clip: the norm over all chunks
            clip_grad_norm(grads, optimizer.grad_clip, self._sum_host)
        optimizer.step(params, grads, lr, offset=self.lo)
        for a, b, values in kept:
            params[a:b] = values

    def _sum_host(self, values):
        """Sum a small float64 host array over the ranks, in place (the clip's squared norm)."""
        self.comm.Allreduce(MPI.IN_PLACE, values)
        return values

    def _own_anchor(self, anchor):
        """This rank's part of FedProx's anchor: given whole (n) or as `anchor()`'s chunk."""
        own = self.n_own
        if anchor.size == self.n:  # whole (a chunk of n elements starts at 0: the same slice)
            return anchor[self.lo:self.lo + own]
        return anchor[:own]

    def _take_buffers(self, grads) -> list:
        """Copy out, and zero in `grads`, the owned parts of the running statistics."""
        kept = [(a, b, grads[a:b].copy()) for a, b in self.buffer_parts]
        for a, b in self.buffer_parts:
            grads[a:b] = 0
        return kept

    def _owned_slots(self):
        """The loss and stop slots this rank owns, if any (a view of `grad_shard`)."""
        n, lo, hi = self.n, self.lo, self.hi
        return self.grad_shard[max(lo, n) - lo:hi - lo]

    def _share_slots(self) -> tuple[float, float]:
        """Put the loss and stop slots, known to their owners, on every rank: all-gather the
        parameters, the slots riding along."""
        n, lo, hi = self.n, self.lo, self.hi
        slots = self._owned_slots()
        start = time.perf_counter()
        self.weights[max(lo, n):hi] = slots
        allgather(self.weights, self.comm, self.algorithm, check=False, bounds=self.bounds)
        self._spans.append((start, time.perf_counter()))
        self.comm_seconds += self._spans[-1][1] - start
        loss, stop = (float(v) for v in to_host(self.weights[n:n + 2]))
        return loss, stop

    def load_shard(self, values) -> None:
        """Set this rank's parameters (n_own elements; collective: the model is re-gathered)."""
        self.shard[:self.n_own] = values
        allgather(self.weights, self.comm, self.algorithm, check=False, bounds=self.bounds)

    def close(self) -> None:
        """Stop the communication thread (local; safe in a `finally`)."""
        if self._pool is not None:
            self._pool.shutdown()
        self.watch.close()


class OptimizerShardedStep(ShardedStep):
    """ZeRO-1 (comm.shard = "optimizer"): whole gradients, reduce-scattered (mean); the owned
    slice of the parameters updated, the parameters all-gathered."""

    stage = "optimizer"

    @classmethod
    def state_elements(cls, n: int, widest: int, ranks: int) -> int:
        return 2 * n + 3 * cls.chunk(n, ranks)  # whole parameters and gradients

    def _make_grads(self, widest: int) -> None:
        self.grad = self.xp.zeros(self.n + 2, dtype=self.dtype)
        self.grad_shard = self.grad[self.lo:self.hi]

    def _grad_buffers(self) -> list:
        return [self.grad]

    def _keep(self, own, lo: int, hi: int) -> None:
        """Nothing to copy: the bucket is the whole buffer, the part already in place."""

    def _backward(self, x, y, ctx, stop: float) -> None:
        """The whole gradient, reduce-scattered at once (or per layer with overlap)."""
        n, futures = self.n, []
        self.grad[n + 1] = stop

        def ready(lo, hi, loss):
            if hi == n:  # the last layer carries the loss and stop slots along
                self.grad[n] = loss
                hi = n + 2
            futures.append(self._run(self._scatter, self.grad[lo:], lo, hi))

        if self._pool is not None:
            self.precision.loss_and_grad(self.spec, self.params, x, y, self.grad[:n],
                                         on_ready=ready, ctx=ctx)
        else:
            self.grad[n] = self.precision.loss_and_grad(self.spec, self.params, x, y,
                                                        self.grad[:n], ctx=ctx)
            futures.append(self._run(self._scatter, self.grad, 0, n + 2))
        for future in futures:
            self._wait(future)


class GradientShardedStep(ShardedStep):
    """ZeRO-2 (comm.shard = "gradients"): no whole gradient buffer: each layer's gradients go
    into one of two buckets of the largest layer's size, reduce-scattered as soon as final, and
    only this rank's part kept."""

    stage = "gradients"

    @classmethod
    def state_elements(cls, n: int, widest: int, ranks: int) -> int:
        return n + 4 * cls.chunk(n, ranks) + 2 * widest  # whole parameters

    def _make_grads(self, widest: int) -> None:
        self.grad_shard = self.xp.zeros(self.hi - self.lo, dtype=self.dtype)
        self.buckets = [self.xp.zeros(widest, dtype=self.dtype) for _ in range(2)]

    def _grad_buffers(self) -> list:
        return [self.grad_shard, *self.buckets]

    _summing = False  # a later micro-batch of optim.accumulate: add to grad_shard

    def _keep(self, own, lo: int, hi: int) -> None:
        a, b = max(lo, self.lo), min(hi, self.hi)
        if b > a:
            if self._summing:
                self.grad_shard[a - self.lo:b - self.lo] += own
            else:
                self.grad_shard[a - self.lo:b - self.lo] = own

    def _layer_params(self):
        """What the model reads each layer's parameters from: here the whole vector."""
        return self.params

    def _backward(self, x, y, ctx, stop: float) -> None:
        """Each micro-batch of optim.accumulate (k rows-slices of x, y) through
        `_micro_backward`, its reduced parts summed into grad_shard, then divided by k (the
        loss and stop slots too: the mean loss; a stop asked stays > 0). Dropout differs per
        micro-batch as unsharded (its step number is step * k + j)."""
        k = getattr(self.spec, "accumulate", 1)
        if k == 1:
            return self._micro_backward(x, y, ctx, stop)
        if x.shape[0] % k:
            raise UserError(f"optim.accumulate: a batch of {x.shape[0]} rows does not split "
                            f"into {k} micro-batches")
        rows = x.shape[0] // k
        self.spec.accumulate = 1  # the model sees one micro-batch at a time
        try:
            for j in range(k):
                self._summing = j > 0
                part = dataclasses.replace(ctx, step=ctx.step * k + j)
                self._micro_backward(x[j * rows:(j + 1) * rows], y[j * rows:(j + 1) * rows],
                                     part, stop)
        finally:
            self.spec.accumulate, self._summing = k, False
        self.grad_shard /= self.grad_shard.dtype.type(k)

    def _micro_backward(self, x, y, ctx, stop: float) -> None:
        """Each layer's gradients into a bucket, reduce-scattered as soon as final."""
        n, pending, slot = self.n, [None, None], [1]

        def bucket(i, lo, hi):
            slot[0] = 1 - slot[0]
            self._wait(pending[slot[0]])  # that bucket's last reduction is done
            pending[slot[0]] = None
            return self.buckets[slot[0]][:hi - lo]

        def ready(lo, hi, loss):
            held = self.buckets[slot[0]]
            if hi == n:
                held[n - lo] = loss  # a device scalar on GPUs: no list of it, no host trip
                held[n - lo + 1] = stop
                hi = n + 2
            pending[slot[0]] = self._run(self._scatter, held, lo, hi)

        self.precision.loss_and_grad(self.spec, self._layer_params(), x, y, bucket,
                                     on_ready=ready, ctx=ctx)
        for future in pending:
            self._wait(future)


class ParameterShardedStep(GradientShardedStep):
    """ZeRO-3 (comm.shard = "parameters"): ZeRO-2's gradients, and between steps each rank holds
    only its chunk of the parameters; each layer is all-gathered into one of two buffers before
    its forward and again before its backward, then dropped. `params` is None: the model is
    whole only through `gather_params`, `model_source` and `gather_to_leader`."""

    stage = "parameters"
    holds_whole_model = False

    @classmethod
    def state_elements(cls, n: int, widest: int, ranks: int) -> int:
        return 5 * cls.chunk(n, ranks) + 4 * widest

    def _make_params(self, params, widest: int) -> None:
        """Hold this rank's chunk only (drawn from spec.seed when `params` is None) and two
        buffers for gathered layers."""
        lo, hi, own, xp = self.lo, self.hi, self.n_own, self.xp
        self.params = None
        self.shard = xp.zeros(hi - lo, dtype=self.dtype)
        self.shard[:own] = (params[lo:lo + own] if params is not None else
                            self.spec.init_range(self.spec.seed, lo, lo + own, xp, self.dtype))
        self.gathered = [xp.empty(widest, dtype=self.dtype) for _ in range(2)]

    def _param_buffers(self) -> list:
        return [self.shard, *self.gathered]

    def _layer_params(self):
        return self._fetcher()

    def _fetcher(self):
        """Return the provider (i, lo, hi) -> layer i's gathered parameters.

        Layers are asked for forward first to last, then backward last to first; the last one
        is asked twice in a row and served once. Each gather goes into the buffer the model is
        done with, the next one started as soon as this one is handed out. The last but one
        layer's backward finds its forward gather still in its buffer: it is not gathered again.
        """
        trained = [i for i, _, _ in self.layers]
        order = trained + trained[::-1][1:]
        ranges = {i: (lo, min(hi, self.n)) for i, lo, hi in self.layers}
        started, position, held = {}, [-1], [None, None]  # held: the layer in each buffer

        def start(j):
            if j < len(order) and j not in started:
                if held[j % 2] == order[j]:  # the parameters do not change within a step
                    started[j] = None
                    return
                held[j % 2] = order[j]
                lo, hi = ranges[order[j]]
                started[j] = self._run(self._gather, self.gathered[j % 2], lo, hi)

        def params_of(i, lo, hi):
            j = position[0]
            if j < 0 or order[j] != i:  # not a repeat of the layer just handed out
                j = position[0] = j + 1
                if j >= len(order) or order[j] != i:
                    raise RuntimeError(f"ZeRO-3: the model asked for layer {i} out of order")
                start(j)
                self._wait(started.pop(j))
                start(j + 1)
            return self.gathered[j % 2][:hi - lo]
        return params_of

    def _share_slots(self) -> tuple[float, float]:
        """Put the loss and stop slots, known to their owners, on every rank (one small
        all-reduce: the parameters stay sharded)."""
        n, lo, hi = self.n, self.lo, self.hi
        slots = self._owned_slots()
        start = time.perf_counter()
        local = np.zeros(2)
        if hi > n:
            local[max(lo, n) - n:hi - n] = to_host(slots)
        self.comm.Allreduce(MPI.IN_PLACE, local)
        self._spans.append((start, time.perf_counter()))
        self.comm_seconds += self._spans[-1][1] - start
        return float(local[0]), float(local[1])

    def load_shard(self, values) -> None:
        """Set this rank's parameters (n_own elements; local)."""
        self.shard[:self.n_own] = values

    def anchor(self):
        """Return a copy of this rank's chunk to anchor FedProx to (`__call__` takes it)."""
        return self.shard[:self.n_own].copy()

    def gather_params(self):
        """Return the whole parameter vector (collective; a new buffer)."""
        full = self.xp.zeros(self.n + 2, dtype=self.dtype)
        full[self.lo:self.hi] = self.shard
        allgather(full, self.comm, self.algorithm, check=False, bounds=self.bounds)
        return full[:self.n]

    def model_source(self):
        """Return a `LayerGather` (collective per layer; the model is never whole)."""
        return LayerGather(self)

    def _counts(self) -> tuple[list[int], list[int]]:
        """Per rank, how many parameters it owns and where they start (Gatherv/Scatterv)."""
        return ([max(0, min(b, self.n) - a) for a, b in self.bounds],
                [min(a, self.n) for a, _ in self.bounds])

    def gather_to_leader(self, out) -> None:
        """Put the whole parameter vector into `out` (n elements) on rank 0 of the step's
        communicator, from every rank's chunk (collective; `out` is ignored elsewhere): what
        an institution's leader sends to the root."""
        counts, starts = self._counts()
        local = to_host(self.shard[:self.n_own])
        whole = None
        if self.comm.rank == 0:  # host arrays are received in place
            whole = out if self.xp is np else np.empty(self.n, dtype=self.dtype)
        self.comm.Gatherv(local, [whole, counts, starts, _mpi_type(self.dtype)], root=0)
        if self.comm.rank == 0 and whole is not out:
            out[...] = self.xp.asarray(whole)

    def scatter_from_leader(self, params) -> None:
        """Set every rank's chunk from `params` (the whole vector, read on rank 0 only;
        collective): after the root's broadcast reached the leader, each rank keeps its chunk."""
        counts, starts = self._counts()
        whole = to_host(params) if self.comm.rank == 0 else None
        mine = np.empty(self.n_own, dtype=self.dtype)
        self.comm.Scatterv([whole, counts, starts, _mpi_type(self.dtype)], mine, root=0)
        self.shard[:self.n_own] = self.xp.asarray(mine) if self.xp is not np else mine

def _mpi_type(dtype):
    """The MPI datatype of a NumPy dtype."""
    from mpi4py.util.dtlib import from_numpy_dtype

    return from_numpy_dtype(np.dtype(dtype))


class LayerGather:
    """ZeRO-3's model, layer by layer: a provider (i, lo, hi) -> layer i's parameters, gathered
    into one of the step's two buffers on each call (valid until the call after next).

    Collective: every rank must ask for the same layers in the same order (forward order, as
    `Sequential.forward` and `save_model` do); `layers` lists them for ranks with nothing to do.
    """

    def __init__(self, step: ParameterShardedStep):
        self.step, self.calls = step, 0
        self.layers = [(i, lo, min(hi, step.n)) for i, lo, hi in step.layers]

    def __call__(self, i: int, lo: int, hi: int):
        out = self.step.gathered[self.calls % 2]
        self.calls += 1
        self.step._gather(out, lo, hi)
        return out[:hi - lo]

    def walk(self) -> None:
        """Take part in one pass over the layers without using them (a rank without rows)."""
        for i, lo, hi in self.layers:
            self(i, lo, hi)


# The registry: comm.shard -> the step class that does it (`make_step` builds from it).
STEPS: dict[str, type[Step]] = {cls.stage: cls for cls in (
    DataParallelStep, OptimizerShardedStep, GradientShardedStep, ParameterShardedStep)}


def step_class(stage: str) -> type[Step]:
    """Return the step class registered for comm.shard `stage`."""
    if stage not in STEPS:
        raise UserError(f"comm.shard: {stage!r} is not one of {', '.join(STAGES)}; use one "
                        "of those")
    return STEPS[stage]


def bytes_per_rank(n: int, widest: int, itemsize: int, stage: str, ranks: int) -> int:
    """Return the bytes of model state one rank holds at `stage` on `ranks` ranks, for n
    parameters whose largest layer has `widest` (see `Step.state_elements`)."""
    return step_class(stage).state_elements(n, widest, ranks) * itemsize
