"""The data-parallel step with the model state sharded over the ranks (ZeRO, Rajbhandari et al.).

The flat buffer of n parameters plus two slots (the rank's loss and stop request, as in
DataParallelStep) is cut into chunk_bounds(n + 2, p); rank r owns chunk r. Stages
(`[comm] shard`):

- "optimizer" (ZeRO-1): whole gradients, reduce-scattered (mean); the unchanged optimiser updates
  the owned slice of the parameters, so its state covers that slice only; the parameters are
  all-gathered. Same bytes on the wire as one all-reduce.
- "gradients" (ZeRO-2): no whole gradient buffer: each layer's gradients go into a bucket of
  the largest layer's size, reduce-scattered as soon as final (in a background thread with
  comm.overlap) and only this rank's part kept.
- "parameters" (ZeRO-3): between steps each rank holds only its chunk of the parameters; each
  layer is all-gathered into a bucket before its forward and again before its backward (the next
  layer's gather overlapping this layer's compute with comm.overlap), then dropped.

The layer boundaries come from a list of parameter ranges, so any model whose forward and
backward ask for one layer at a time can be sharded this way.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..comm import allgather, reduce_scatter
from ..comm.checks import check_same_signature
from ..comm.ring import chunk_bounds
from ..errors import UserError
from ..nn.models import layer_ranges, loss_and_grad

STAGES = ("none", "optimizer", "gradients", "parameters")


def part_bounds(lo: int, hi: int, bounds: list) -> list[tuple[int, int]]:
    """Return each rank's part of [lo, hi) as (start, stop) relative to lo, in rank order."""
    width = hi - lo
    return [(min(max(a - lo, 0), width), min(max(b - lo, 0), width)) for a, b in bounds]


class ShardedStep:
    """A data-parallel step over `comm` with the model state sharded at `stage` (see module).

    Same call as DataParallelStep; `params` is the whole model for "optimizer" and "gradients"
    (all-gathered after each step) and None for "parameters" (use `gather_params()`).
    """

    def __init__(self, spec, params, comm, algorithm: str, xp, overlap: bool, stage: str):
        if stage not in STAGES[1:]:
            raise ValueError(f"ShardedStep: stage {stage!r} is not one of {STAGES[1:]}")
        self.spec, self.comm, self.stage, self.xp = spec, comm, stage, xp
        self.algorithm = "mpi" if algorithm == "nccl" else algorithm  # no NCCL halves yet
        self.n, self.dtype = params.size, params.dtype
        self.bounds = chunk_bounds(self.n + 2, comm.size)
        self.lo, self.hi = self.bounds[comm.rank]
        self.layers = layer_ranges(spec, params.dtype)
        self.layers[-1] = (self.layers[-1][0], self.n + 2)  # the last layer carries the slots
        check_same_signature(comm, self.n + 2, params.dtype)  # once; steps skip it
        if stage == "parameters":
            self.weights = None
            self.shard = xp.empty(self.hi - self.lo, dtype=params.dtype)
            self.shard[:self.n_own] = params[self.lo:self.lo + self.n_own]
            self.params = None
        else:
            self.weights = xp.empty(self.n + 2, dtype=params.dtype)
            self.weights[:self.n] = params
            self.params = self.weights[:self.n]
            self.shard = self.weights[self.lo:self.hi]
        widest = max(b - a for a, b in self.layers)
        if stage == "optimizer":
            self.grad = xp.zeros(self.n + 2, dtype=params.dtype)
            self.grad_shard = self.grad[self.lo:self.hi]
        else:
            self.grad = None
            self.grad_shard = xp.zeros(self.hi - self.lo, dtype=params.dtype)
            self.buckets = [xp.zeros(widest, dtype=params.dtype) for _ in range(2)]
        if stage == "parameters":
            self.gathered = [xp.empty(widest, dtype=params.dtype) for _ in range(2)]
        self.stop_agreed = False
        self.comm_seconds = 0.0
        self._pool = (ThreadPoolExecutor(1, thread_name_prefix="mpifed-comm")
                      if overlap and comm.size > 1 else None)

    @property
    def n_own(self) -> int:
        """How many of this rank's chunk are parameters (the rest: the loss and stop slots)."""
        return max(0, min(self.hi, self.n) - self.lo)

    # --- communication -------------------------------------------------------------------

    def _timed(self, fn, *args):
        start = time.perf_counter()
        fn(*args)
        return time.perf_counter() - start

    def _run(self, fn, *args):
        """Run `fn` now, or on the communication thread with overlap; return a waitable."""
        if self._pool is not None:
            return self._pool.submit(self._timed, fn, *args)
        self.comm_seconds += self._timed(fn, *args)
        return None

    def _wait(self, futures) -> None:
        start = time.perf_counter()
        for future in futures:
            if future is not None:
                future.result()
        self.comm_seconds += time.perf_counter() - start

    def _scatter_layer(self, bucket, lo: int, hi: int) -> None:
        """Reduce-scatter one layer's gradients; keep this rank's part in grad_shard."""
        parts = part_bounds(lo, hi, self.bounds)
        own = reduce_scatter(bucket[:hi - lo], self.comm, "mean", self.algorithm, check=False,
                             bounds=parts)
        a, b = max(lo, self.lo), min(hi, self.hi)
        if b > a:
            self.grad_shard[a - self.lo:b - self.lo] = own

    def _gather_layer(self, out, lo: int, hi: int) -> None:
        """All-gather parameters [lo, hi) into `out` from the owners' shards."""
        a, b = max(lo, self.lo), min(hi, self.hi)
        if b > a:
            out[a - lo:b - lo] = self.shard[a - self.lo:b - self.lo]
        allgather(out[:hi - lo], self.comm, self.algorithm, check=False,
                  bounds=part_bounds(lo, hi, self.bounds))

    # --- the backward pass, per stage ------------------------------------------------------

    def _gradients_whole(self, x, y) -> None:
        """ZeRO-1: the whole gradient, reduce-scattered at once (or per layer with overlap)."""
        n, futures = self.n, []

        def ready(lo, hi, loss):
            if hi == n:
                self.grad[n] = loss
                hi = n + 2
            futures.append(self._run(self._scatter_whole, lo, hi))

        if self._pool is not None:
            loss_and_grad(self.spec, self.params, x, y, self.grad[:n], on_ready=ready)
        else:
            self.grad[n] = loss_and_grad(self.spec, self.params, x, y, self.grad[:n])
            futures.append(self._run(self._scatter_whole, 0, n + 2))
        self._wait(futures)

    def _scatter_whole(self, lo: int, hi: int) -> None:
        reduce_scatter(self.grad[lo:hi], self.comm, "mean", self.algorithm, check=False,
                       bounds=part_bounds(lo, hi, self.bounds))

    def _gradients_bucketed(self, x, y, params) -> None:
        """ZeRO-2/3: each layer's gradients into a bucket, reduce-scattered as soon as final."""
        n, futures, stop = self.n, {}, self._stop
        last = len(self.layers) - 1

        def bucket(k, lo, hi):
            slot = k % 2
            self._wait([futures.pop(slot, None)])  # that bucket's reduction is done
            return self.buckets[slot][:hi - lo]

        def ready(lo, hi, loss):
            k = next(i for i, (a, _) in enumerate(self.layers) if a == lo)
            slot = k % 2
            if k == last:
                self.buckets[slot][n - lo:n - lo + 2] = (loss, stop)
                hi = n + 2
            futures[slot] = self._run(self._scatter_layer, self.buckets[slot], lo, hi)

        loss_and_grad(self.spec, params, x, y, bucket, on_ready=ready)
        self._wait(list(futures.values()))

    def _fetcher(self):
        """Return params_of(layer, lo, hi) for ZeRO-3: gathers in the order the model asks,
        the next one started ahead on the communication thread with overlap."""
        count = len(self.layers)
        order = list(range(count)) + list(range(count - 1, 0, -1))
        futures, position = {}, [0]

        def start(i):
            if i < len(order) and i not in futures:
                k = order[i]
                lo, hi = self.layers[k][0], min(self.layers[k][1], self.n)
                futures[i] = self._run(self._gather_layer, self.gathered[i % 2], lo, hi)

        def params_of(k, lo, hi):
            i = position[0]
            position[0] += 1
            start(i)
            self._wait([futures.pop(i)])
            start(i + 1)  # into the other buffer, whose layer the model is done with
            return self.gathered[i % 2][:hi - lo]
        return params_of

    # --- the step --------------------------------------------------------------------------

    def __call__(self, x, y, optimizer, lr: float, step_number: int, anchor=None, mu=0.0,
                 stop: float = 0.0):
        """Take one step on the batch (x, y); return the global mean loss (same on all ranks)."""
        n, lo = self.n, self.lo
        self._stop = stop
        if self.stage == "optimizer":
            self.grad[n + 1] = stop
            self._gradients_whole(x, y)
        elif self.stage == "gradients":
            self._gradients_bucketed(x, y, self.params)
        else:
            self._gradients_bucketed(x, y, self._fetcher())
        grads, params = self.grad_shard[:self.n_own], self.shard[:self.n_own]
        if anchor is not None and mu:
            grads += mu * (params - anchor[lo:lo + self.n_own])
        optimizer.step(params, grads, lr)
        loss, stop_mean = self._share_slots()
        self.stop_agreed = stop_mean > 0
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise UserError(f"training diverged: the loss is {loss} at step {step_number}; "
                            "lower optim.lr or add optim.warmup")
        return loss

    def _share_slots(self) -> tuple[float, float]:
        """Put the loss and stop slots, known to their owners, on every rank; gather params."""
        n, lo, hi = self.n, self.lo, self.hi
        if self.stage == "parameters":
            local = np.zeros(2)
            for i in range(max(lo, n), hi):
                local[i - n] = float(self.grad_shard[i - lo])
            start = time.perf_counter()
            self.comm.Allreduce(np.array(local), local)
            self.comm_seconds += time.perf_counter() - start
            return float(local[0]), float(local[1])
        a = max(lo, n)
        if hi > a:
            self.weights[a:hi] = self.grad_shard[a - lo:hi - lo]
        start = time.perf_counter()
        allgather(self.weights, self.comm, self.algorithm, check=False, bounds=self.bounds)
        self.comm_seconds += time.perf_counter() - start
        return float(self.weights[n]), float(self.weights[n + 1])

    # --- whole model on demand -------------------------------------------------------------

    def gather_params(self):
        """Return the whole parameter vector (collective; a new buffer for "parameters")."""
        if self.stage != "parameters":
            return self.params
        full = self.xp.empty(self.n + 2, dtype=self.dtype)
        full[self.lo:self.hi] = self.shard
        allgather(full, self.comm, self.algorithm, check=False, bounds=self.bounds)
        return full[:self.n]

    def memory_bytes(self) -> dict:
        """Return the bytes this rank holds for parameters and gradients (buffers included)."""
        held = [self.weights if self.weights is not None else self.shard]
        held += self.gathered if self.stage == "parameters" else []
        grads = [self.grad] if self.grad is not None else [self.grad_shard, *self.buckets]
        return {"param_bytes": int(sum(a.nbytes for a in held)),
                "grad_bytes": int(sum(a.nbytes for a in grads))}

    def load_shard(self, values) -> None:
        """Set this rank's parameters (n_own elements; collective: the model is re-gathered)."""
        self.shard[:self.n_own] = values
        if self.stage != "parameters":
            allgather(self.weights, self.comm, self.algorithm, check=False, bounds=self.bounds)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()

    def free(self) -> None:
        return None
