"""The step protocol (`Step`), and one synchronous data-parallel step on a communicator (the
world, or one institution).

A step is what the training loops call once per batch. `make_step` builds the one comm.shard
names, from the registry `sharded_step.STEPS`:

    "none"        DataParallelStep       (here) whole model on every rank, one all-reduce
    "optimizer"   OptimizerShardedStep   (sharded_step.py) ZeRO-1
    "gradients"   GradientShardedStep    (sharded_step.py) ZeRO-2
    "parameters"  ParameterShardedStep   (sharded_step.py) ZeRO-3

Every one is a `Step`; the loops, the federation and the checkpoints use only what `Step` lists,
and never ask which one they hold.
"""

from __future__ import annotations

import abc

import numpy as np

from ..comm import allreduce
from ..comm.checks import check_same_signature
from ..comm.compression import COMPRESSORS, make_compressor, model_blocks
from ..comm.compression.exchange import GradientSum
from ..comm.shared import release, shared_array
from ..comm.stall import StallWatch
from ..comm.topology import topology
from ..errors import UserError
from ..nn.layers import Context
from ..optim.clip import clip_grad_norm
from ..xp import device_thread_pool, mark, record_event, seconds_between, to_host, wait_event
from .allreduce_choice import choose_for_step
from .precision import FULL


def _gradient_buffer(size: int, dtype, comm, algorithm: str, xp):
    """Return a zeroed gradient buffer; in node shared memory when the hierarchical all-reduce
    will move it, so that it reduces with no copy at all."""
    if xp is np and comm.size > 1 and algorithm in ("auto", "hierarchical"):
        node, _ = topology(comm)
        if node.size > 1:
            buf = shared_array(size, dtype, node)
            buf[...] = 0
            return buf
    return xp.zeros(size, dtype=dtype)


def make_step(spec, params, comm, settings, xp, dtype=None, precision=None) -> Step:
    """Return the step that the `[comm]` settings ask for (collective over `comm`).

    settings: read by attribute only: `shard` (the registry name), `allreduce`, `overlap`,
    `stall_timeout` (seconds; 0 turns the stall check off) and the compression keys
    (`compression` and its options, read by `make_compressor`).
    params: the whole flat model; for shard = "parameters" it may be None, and each rank then
    draws only its chunk from spec.seed (the model is never whole on any rank); `dtype` says
    the parameters' dtype then. precision: train/precision.py's (None: fp32, as before).
    """
    from .sharded_step import step_class  # the registry builds on this module

    dtype = params.dtype if params is not None else dtype
    compressor = make_compressor(settings, model_blocks(spec, dtype), xp, dtype,
                                 seed=getattr(spec, "seed", 0))  # before any collective
    return step_class(settings.shard)(spec, params, comm, settings.allreduce, xp,
                                      settings.overlap, stall_timeout=settings.stall_timeout,
                                      dtype=dtype, compressor=compressor, precision=precision)


class Step(abc.ABC):
    """One data-parallel training step over a communicator: what every variant offers.

    Construction (the same for every variant, so the registry builds any of them alike):
    `Cls(spec, params, comm, algorithm, xp, overlap, *, stall_timeout, dtype=None,
    compressor=None, precision=None)`; collective over `comm`. compressor: the
    comm.compression scheme (comm/compression/; None: the exact mean). precision: the compute
    precision (train/precision.py; None: the parameters' own dtype): under fp16/bf16 a step
    whose gradients overflowed on any rank is skipped on every rank.

    Class attributes:
        stage: the comm.shard name the registry knows it by (written into sharded checkpoints).
        holds_whole_model: `params` is the whole flat model on every rank after each step;
            False where each rank holds only its chunk (ZeRO-3: `params` is None).
        sharded: each rank holds its own part of the model's state, so each writes and reads
            its part of a checkpoint (sharded_checkpoint.py; see `ShardedStep`).

    Instance attributes:
        params: the whole flat parameters (n,), updated in place by each step, or None.
        comm_seconds: seconds this rank spent in (or blocked on) the step's communication.
        comm_spans: the last step's reductions as (start, end) perf_counter seconds, where they
            ran (on the communication thread under overlap), for the timeline; None where the
            step does not record them (device arrays: host marks do not time device work).
        compute_end: the perf_counter time the last step's own computation ended (backward
            pass done; the sharded steps: their update done), or None with comm_spans.
        stop_agreed: after a step, whether any rank asked to stop.
        allreduce_choice: {bucket bytes: algorithm} (strings) that the gradient all-reduces
            run, for the summary; None where the step does not say.
        compressor: the gradient exchange's compressor (its state goes into checkpoints), or
            None where the step exchanges gradients with its own collectives.
        precision: `FullPrecision` or `MixedPrecision` (its `scaler` goes into checkpoints).
        skipped: after a step, whether it was skipped (mixed precision's overflow).

    The methods with a body here are those of a step whose `params` is whole on every rank;
    a step that holds only a chunk overrides them.
    """

    stage: str
    holds_whole_model = True
    sharded = False
    params = None
    comm_seconds = 0.0
    comm_spans = None
    compute_end = None
    stop_agreed = False
    allreduce_choice = None
    compressor = None
    precision = FULL
    skipped = False

    def _note_spans(self, spans: list, compute_end) -> None:
        """Keep the step's reduction spans for the timeline (host marks only: device events
        have no host time)."""
        host = isinstance(compute_end, float)
        self.comm_spans = list(spans) if host else None
        self.compute_end = compute_end if host else None

    @abc.abstractmethod
    def __call__(self, x, y, optimizer, lr: float, step_number: int, anchor=None, mu=0.0,
                 stop: float = 0.0) -> float:
        """Take one step on the batch (x, y); return the global mean loss (same on all ranks).

        stop: 1.0 if this rank was asked to stop; afterwards `stop_agreed` tells whether any
        was. anchor, mu: FedProx's proximal term (mu/2)||w - anchor||^2, anchor as `anchor()`
        returns it (or the whole model). Raises UserError on every rank if the loss diverged.
        """

    @classmethod
    @abc.abstractmethod
    def state_elements(cls, n: int, widest: int, ranks: int) -> int:
        """Return how many elements of model state one rank holds on `ranks` ranks, for n
        parameters whose largest layer has `widest`: parameters, gradients, two optimiser
        states (Adam's m and v), a checkpoint's host copy, and any working buffers."""

    def exchange_bytes(self) -> tuple[int, int]:
        """Return (bytes this rank sent, bytes it would have sent uncompressed) for gradient
        exchange so far (running totals; library collectives count as the ring would)."""
        if self.compressor is None:
            return 0, 0
        return self.compressor.bytes_sent(), self.compressor.uncompressed_bytes()

    @abc.abstractmethod
    def memory_bytes(self) -> dict:
        """Return the bytes this rank holds: {"param_bytes": ..., "grad_bytes": ...}."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop the step's threads (local; safe in a `finally`)."""

    def free(self) -> None:
        """Free what the step shares between ranks (collective, so only on the path all ranks
        take, never in a `finally` one failing rank would reach alone)."""
        return None

    def anchor(self):
        """Return a copy of the model to anchor FedProx to (`__call__` takes it back)."""
        return self.params.copy()

    def gather_params(self):
        """Return the whole parameter vector (collective)."""
        return self.params

    def model_source(self):
        """Return the model for evaluation and model.h5: flat parameters, or a provider of
        each layer's (collective per layer; see sharded_step.LayerGather)."""
        return self.params

    def gather_to_leader(self, out) -> None:
        """Put the whole model into `out` on rank 0 of the step's communicator (collective):
        nothing to do when `params` is whole on every rank."""
        return None

    def scatter_from_leader(self, params) -> None:
        """Set every rank's model from `params`, read on rank 0 (collective): nothing to do
        when `params` is whole on every rank (it is the leader's buffer)."""
        return None


class DataParallelStep(Step):
    """Local gradient, one all-reduce (mean) of gradients and loss, the same update on every rank
    (comm.shard = "none").

    The flat gradient buffer carries two extra slots: the rank's loss, so the step's single
    all-reduce also yields the global mean loss, and its stop request (a signal arrived), so all
    ranks agree on stopping at no extra cost; both come back to the host in one transfer.
    Collective over `comm`. `dtype` is not read: `params` carries it.

    On a GPU, communication is timed between CUDA events (NCCL returns before it is done, and a
    host clock around a staged reduction would charge it the backward pass it waits for).
    """

    stage = "none"

    def __init__(self, spec, params, comm, algorithm: str, xp, overlap: bool, *,
                 stall_timeout: float, dtype=None, compressor=None, precision=None):
        self.spec, self.params, self.comm, self.algorithm = spec, params, comm, algorithm
        self.precision = precision or FULL
        self.xp = xp
        self.compressor = compressor or COMPRESSORS["none"](
            model_blocks(spec, params.dtype), xp=xp, dtype=params.dtype)
        self._sum = GradientSum(comm, algorithm)  # the all-reduce the compressor wraps
        self.grad = _gradient_buffer(params.size + 2, params.dtype, comm, algorithm, xp)
        self.stop_agreed = False  # after a step: some rank asked to stop
        check_same_signature(comm, self.grad.size, self.grad.dtype)  # once; steps skip it
        # "auto": measured (or read from the per-topology cache) and installed on comm
        self.allreduce_choice = choose_for_step(spec, self.grad, comm, algorithm, xp, overlap)
        self.comm_seconds, self._step_number = 0.0, 0
        self.watch = StallWatch(comm, stall_timeout)  # names the ranks an all-reduce waits for
        # Overlap: one thread reduces each layer's gradients, last layer first, while the
        # backward pass goes on (DDP's buckets). Every rank issues the same reductions in the
        # same order, so the collectives match. On a GPU the thread works on this rank's
        # device, on a stream of its own, ordered against the compute stream by events.
        self._pool = (device_thread_pool(xp, "mpifed-comm")
                      if overlap and comm.size > 1 else None)

    @classmethod
    def state_elements(cls, n: int, widest: int, ranks: int) -> int:
        return 5 * n  # everything whole: parameters, gradients, m, v, the checkpoint's copy

    def _reduce(self, lo: int, hi: int, after=None) -> tuple:
        """Mean-reduce grad[lo:hi] through the compressor once event `after` has happened;
        return its (start, end) time marks. The stall watch is armed while the exchange
        waits. A range reaching past the model carries the loss and stop slots, which the
        compressor returns exact."""
        wait_event(after)
        start = mark(self.xp)
        self.watch.arm(self._step_number)
        self.compressor.reduce_mean(self.grad[lo:hi], lo, self._sum, self.comm.size,
                                    self._step_number)
        self.watch.disarm()
        return start, mark(self.xp)

    def _sum_over_ranks(self, buf):
        """Sync batch norm's reducer: sum a small array over the ranks, in place. With overlap
        it queues behind the layer reductions already started, so every rank issues its
        collectives in the same order."""
        def reduce():
            return allreduce(buf, self.comm, "sum", "nccl" if self.algorithm == "nccl" else "mpi",
                             check=False)
        return self._pool.submit(reduce).result() if self._pool is not None else reduce()

    def _context(self, step_number: int) -> Context:
        return Context(train=True, seed=getattr(self.spec, "seed", 0), step=step_number,
                       rank=self.comm.rank, reduce=self._sum_over_ranks if self.comm.size > 1
                       else None)

    def _backward_overlapped(self, x, y, ctx) -> tuple:
        """Gradients with each layer's all-reduce started as soon as the layer is done; return
        the time marks (backward done, last reduction done)."""
        n = self.params.size
        futures = []

        def ready(lo, hi, loss):
            if hi == n:  # the last layer carries the loss and stop slots along
                self.grad[n] = loss
                hi = n + 2
            futures.append(self._pool.submit(self._reduce, lo, hi, record_event(self.xp)))

        self.precision.loss_and_grad(self.spec, self.params, x, y, self.grad[:n],
                                     on_ready=ready, ctx=ctx)
        backward_done = mark(self.xp)
        spans = [future.result() for future in futures]
        wait_event(spans[-1][1])  # one comm stream, in order: the last reduction ends them all
        self._note_spans(spans, backward_done)
        return backward_done, spans[-1][1]

    def memory_bytes(self) -> dict:
        """Return the bytes this rank holds for parameters and gradients (half-precision
        copies included)."""
        half = self.precision.memory_bytes()
        return {"param_bytes": int(self.params.nbytes) + half["param_bytes"],
                "grad_bytes": int(self.grad.nbytes) + half["grad_bytes"]}

    def close(self) -> None:
        """Stop the communication thread (local; safe in a `finally`)."""
        if self._pool is not None:
            self._pool.shutdown()
        self.watch.close()

    def free(self) -> None:
        """Free the shared gradient window: collective, so only on the path all ranks take,
        never in a `finally` that one failing rank would reach alone."""
        release(self.grad)

    def __call__(self, x, y, optimizer, lr: float, step_number: int, anchor=None, mu=0.0,
                 stop: float = 0.0) -> float:
        """Take one step on the batch (x, y); return the global mean loss (see `Step`).

        FedProx's gradient mu (w - anchor) is added after the all-reduce (it is the same on
        every rank). Under mixed precision a step whose gradients overflowed on any rank is
        skipped on every rank (`skipped`): parameters, buffers, optimiser state unchanged.
        """
        n = self.params.size
        grads = self.grad[:n]
        self.grad[n + 1] = stop
        self._step_number = step_number
        ctx = self._context(step_number)
        if self._pool is not None:
            start, end = self._backward_overlapped(x, y, ctx)
        else:
            self.grad[n] = self.precision.loss_and_grad(self.spec, self.params, x, y, grads,
                                                        ctx=ctx)
            start, end = self._reduce(0, n + 2)
            self._note_spans([(start, end)], start)
        loss, stop_flag = (float(v) for v in to_host(self.grad[n:n + 2]))  # one transfer
        self.stop_agreed = stop_flag > 0
        # overlapped: the part the backward did not hide (none if it ended first)
        self.comm_seconds += max(0.0, seconds_between(start, end))
        diverged(loss, step_number, self.precision)
        self.skipped = self.precision.skip_step(self.comm)  # agreed by every rank
        if self.skipped:
            return loss
        buffers = self.spec.take_buffers(grads)  # running statistics, averaged: not trained
        if anchor is not None and mu:
            grads += mu * (self.params - anchor)
            self.spec.take_buffers(grads)
        if getattr(optimizer, "grad_clip", 0):  # optim.grad_clip: the whole gradient is here
            clip_grad_norm(grads, optimizer.grad_clip)
        optimizer.step(self.params, grads, lr)
        self.spec.put_buffers(self.params, buffers)
        return loss


def diverged(loss: float, step_number: int, precision) -> None:
    """Raise UserError (on every rank: the loss is the global mean) if the loss is not finite."""
    if loss == loss and loss not in (float("inf"), float("-inf")):
        return
    half = "" if precision.scaler is None else (
        "; in half precision the forward pass itself overflowed, which loss scaling cannot "
        "help: try model.precision = \"bf16\" or \"fp32\"")
    raise UserError(f"training diverged: the loss is {loss} at step {step_number}; lower "
                    f"optim.lr or add optim.warmup{half}")
