"""One synchronous data-parallel step on a communicator (the world, or one institution)."""

from __future__ import annotations

import numpy as np

from ..comm import allreduce
from ..comm.checks import check_same_signature
from ..comm.shared import release, shared_array
from ..comm.stall import StallWatch
from ..comm.topology import topology
from ..errors import UserError
from ..nn.layers import Context
from ..nn.models import loss_and_grad
from ..xp import device_thread_pool, mark, record_event, seconds_between, to_host, wait_event


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


def make_step(spec, params, comm, comm_cfg, xp, dtype=None):
    """Return the data-parallel step that `[comm]` asks for: DataParallelStep, or a ShardedStep
    when comm.shard is "optimizer", "gradients" or "parameters" (ZeRO stages 1 to 3).

    params: the whole flat model; for "parameters" it may be None, and each rank then draws only
    its chunk from spec.seed (the model is never whole on any rank).
    """
    stage, stall = comm_cfg.shard, comm_cfg.stall_timeout
    if stage == "none":
        return DataParallelStep(spec, params, comm, comm_cfg.allreduce, xp,
                                comm_cfg.overlap, stall)
    from .sharded_step import ShardedStep

    return ShardedStep(spec, params, comm, comm_cfg.allreduce, xp, comm_cfg.overlap, stage,
                       stall, dtype)


class DataParallelStep:
    """Local gradient, one all-reduce (mean) of gradients and loss, the same update on every rank.

    The flat gradient buffer carries two extra slots: the rank's loss, so the step's single
    all-reduce also yields the global mean loss, and its stop request (a signal arrived), so all
    ranks agree on stopping at no extra cost; both come back to the host in one transfer.
    Collective over `comm`.

    On a GPU, communication is timed between CUDA events (NCCL returns before it is done, and a
    host clock around a staged reduction would charge it the backward pass it waits for).
    """

    def __init__(self, spec, params, comm, algorithm: str, xp, overlap: bool = False,
                 stall_timeout: float = 0.0):
        self.spec, self.params, self.comm, self.algorithm = spec, params, comm, algorithm
        self.xp = xp
        self.grad = _gradient_buffer(params.size + 2, params.dtype, comm, algorithm, xp)
        self.stop_agreed = False  # after a step: some rank asked to stop
        self.stage = "none"
        check_same_signature(comm, self.grad.size, self.grad.dtype)  # once; steps skip it
        self.comm_seconds, self._step_number = 0.0, 0
        self.watch = StallWatch(comm, stall_timeout)  # names the ranks an all-reduce waits for
        # Overlap: one thread reduces each layer's gradients, last layer first, while the
        # backward pass goes on (DDP's buckets). Every rank issues the same reductions in the
        # same order, so the collectives match. On a GPU the thread works on this rank's
        # device, on a stream of its own, ordered against the compute stream by events.
        self._pool = (device_thread_pool(xp, "mpifed-comm")
                      if overlap and comm.size > 1 else None)

    def _reduce(self, lo: int, hi: int, after=None) -> tuple:
        """Mean-reduce grad[lo:hi] once event `after` has happened; return its (start, end)
        time marks. The stall watch is armed while the all-reduce waits."""
        wait_event(after)
        start = mark(self.xp)
        self.watch.arm(self._step_number)
        allreduce(self.grad[lo:hi], self.comm, "mean", self.algorithm, check=False)
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

        loss_and_grad(self.spec, self.params, x, y, self.grad[:n], on_ready=ready, ctx=ctx)
        backward_done = mark(self.xp)
        spans = [future.result() for future in futures]
        wait_event(spans[-1][1])  # one comm stream, in order: the last reduction ends them all
        return backward_done, spans[-1][1]

    def gather_params(self):
        """Return the whole parameter vector (every rank holds it)."""
        return self.params

    def anchor(self):
        """Return a copy of the model (FedProx's anchor)."""
        return self.params.copy()

    def gather_to_leader(self, out) -> None:
        """Nothing to gather: `params` is whole on every rank (ShardedStep's interface)."""

    def scatter_from_leader(self, params) -> None:
        """Nothing to scatter: `params` is whole on every rank (ShardedStep's interface)."""

    def memory_bytes(self) -> dict:
        """Return the bytes this rank holds for parameters and gradients."""
        return {"param_bytes": int(self.params.nbytes), "grad_bytes": int(self.grad.nbytes)}

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
                 stop: float = 0.0):
        """Take one step on the batch (x, y); return the global mean loss (same on all ranks).

        stop: 1.0 if this rank was asked to stop; afterwards `stop_agreed` tells whether any was.

        anchor, mu: FedProx's proximal term (mu/2)||w - anchor||^2, whose gradient
        mu (w - anchor) is added after the all-reduce (it is the same on every rank).
        """
        n = self.params.size
        grads = self.grad[:n]
        self.grad[n + 1] = stop
        self._step_number = step_number
        ctx = self._context(step_number)
        if self._pool is not None:
            start, end = self._backward_overlapped(x, y, ctx)
        else:
            self.grad[n] = loss_and_grad(self.spec, self.params, x, y, grads, ctx=ctx)
            start, end = self._reduce(0, n + 2)
        loss, stop_flag = (float(v) for v in to_host(self.grad[n:n + 2]))  # one transfer
        self.stop_agreed = stop_flag > 0
        # overlapped: the part the backward did not hide (none if it ended first)
        self.comm_seconds += max(0.0, seconds_between(start, end))
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise UserError(f"training diverged: the loss is {loss} at step {step_number}; "
                            "lower optim.lr or add optim.warmup")
        buffers = self.spec.take_buffers(grads)  # running statistics, averaged: not trained
        if anchor is not None and mu:
            grads += mu * (self.params - anchor)
            self.spec.take_buffers(grads)
        optimizer.step(self.params, grads, lr)
        self.spec.put_buffers(self.params, buffers)
        return loss
