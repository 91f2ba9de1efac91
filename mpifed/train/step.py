"""One synchronous data-parallel step on a communicator (the world, or one institution)."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..comm import allreduce
from ..comm.checks import check_same_signature
from ..comm.shared import release, shared_array
from ..comm.topology import topology
from ..errors import UserError
from ..nn.models import loss_and_grad
from .sharded_step import ShardedStep


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


def make_step(spec, params, comm, comm_cfg: dict, xp):
    """Return the data-parallel step that `[comm]` asks for: DataParallelStep, or a ShardedStep
    when comm.shard is "optimizer", "gradients" or "parameters" (ZeRO stages 1 to 3)."""
    stage = comm_cfg.get("shard", "none")
    if stage == "none":
        return DataParallelStep(spec, params, comm, comm_cfg["allreduce"], xp, comm_cfg["overlap"])
    return ShardedStep(spec, params, comm, comm_cfg["allreduce"], xp, comm_cfg["overlap"], stage)


class DataParallelStep:
    """Local gradient, one all-reduce (mean) of gradients and loss, the same update on every rank.

    The flat gradient buffer carries two extra slots: the rank's loss, so the step's single
    all-reduce also yields the global mean loss, and its stop request (a signal arrived), so all
    ranks agree on stopping at no extra cost. Collective over `comm`.
    """

    def __init__(self, spec, params, comm, algorithm: str, xp, overlap: bool = False):
        self.spec, self.params, self.comm, self.algorithm = spec, params, comm, algorithm
        self.grad = _gradient_buffer(params.size + 2, params.dtype, comm, algorithm, xp)
        self.stop_agreed = False  # after a step: some rank asked to stop
        self.stage = "none"
        check_same_signature(comm, self.grad.size, self.grad.dtype)  # once; steps skip it
        self.comm_seconds = 0.0
        # Overlap: one thread reduces each layer's gradients, last layer first, while the
        # backward pass goes on (DDP's buckets). Every rank issues the same reductions in the
        # same order, so the collectives match.
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="mpifed-comm")
                      if overlap and comm.size > 1 else None)

    def _reduce(self, lo: int, hi: int) -> float:
        start = time.perf_counter()
        allreduce(self.grad[lo:hi], self.comm, "mean", self.algorithm, check=False)
        return time.perf_counter() - start

    def _backward_overlapped(self, x, y) -> None:
        """Gradients with each layer's all-reduce started as soon as the layer is done."""
        n = self.params.size
        futures = []

        def ready(lo, hi, loss):
            if hi == n:  # the last layer carries the loss and stop slots along
                self.grad[n] = loss
                hi = n + 2
            futures.append(self._pool.submit(self._reduce, lo, hi))

        loss_and_grad(self.spec, self.params, x, y, self.grad[:n], on_ready=ready)
        start = time.perf_counter()
        for future in futures:
            future.result()
        self.comm_seconds += time.perf_counter() - start  # the part the backward did not hide

    def gather_params(self):
        """Return the whole parameter vector (every rank holds it)."""
        return self.params

    def memory_bytes(self) -> dict:
        """Return the bytes this rank holds for parameters and gradients."""
        return {"param_bytes": int(self.params.nbytes), "grad_bytes": int(self.grad.nbytes)}

    def close(self) -> None:
        """Stop the communication thread (local; safe in a `finally`)."""
        if self._pool is not None:
            self._pool.shutdown()

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
        if self._pool is not None:
            self._backward_overlapped(x, y)
        else:
            self.grad[n] = loss_and_grad(self.spec, self.params, x, y, grads)
            self.comm_seconds += self._reduce(0, n + 2)
        loss = float(self.grad[n])
        self.stop_agreed = bool(self.grad[n + 1] > 0)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise UserError(f"training diverged: the loss is {loss} at step {step_number}; "
                            "lower optim.lr or add optim.warmup")
        if anchor is not None and mu:
            grads += mu * (self.params - anchor)
        optimizer.step(self.params, grads, lr)
        return loss
