"""One synchronous data-parallel step on a communicator (the world, or one institution)."""

from __future__ import annotations

import time

from ..comm import allreduce
from ..comm.checks import check_same_signature
from ..errors import UserError
from ..nn.models import loss_and_grad


class DataParallelStep:
    """Local gradient, one all-reduce (mean) of gradients and loss, the same update on every rank.

    The flat gradient buffer carries the rank's loss in one extra slot, so the step's single
    all-reduce also yields the global mean loss. Collective over `comm`.
    """

    def __init__(self, spec, params, comm, algorithm: str, xp):
        self.spec, self.params, self.comm, self.algorithm = spec, params, comm, algorithm
        self.grad = xp.zeros(params.size + 1, dtype=params.dtype)
        check_same_signature(comm, self.grad.size, self.grad.dtype)  # once; steps skip it
        self.comm_seconds = 0.0

    def __call__(self, x, y, optimizer, lr: float, step_number: int, anchor=None, mu=0.0):
        """Take one step on the batch (x, y); return the global mean loss (same on all ranks).

        anchor, mu: FedProx's proximal term (mu/2)||w - anchor||^2, whose gradient
        mu (w - anchor) is added after the all-reduce (it is the same on every rank).
        """
        n = self.params.size
        grads = self.grad[:n]
        self.grad[n] = loss_and_grad(self.spec, self.params, x, y, grads)
        start = time.perf_counter()
        allreduce(self.grad, self.comm, "mean", self.algorithm, check=False)
        self.comm_seconds += time.perf_counter() - start
        loss = float(self.grad[n])
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise UserError(f"training diverged: the loss is {loss} at step {step_number}; "
                            "lower optim.lr or add optim.warmup")
        if anchor is not None and mu:
            grads += mu * (self.params - anchor)
        optimizer.step(self.params, grads, lr)
        return loss
