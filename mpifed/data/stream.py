"""Which rows each step reads: a rank's batch stream over its shard, and a prefetching loader.

A rank walks its shard in order, or in a fresh permutation per epoch seeded by (seed, epoch,
rank). Its stream continues across epochs, and its position (epoch, offset) is all the state a
checkpoint needs to resume it.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def epoch_order(shard_len: int, seed: int, epoch: int, rank: int, shuffle: bool) -> np.ndarray:
    """Return the shard-local row order of one epoch (a permutation when shuffling)."""
    if not shuffle:
        return np.arange(shard_len)
    return np.random.default_rng([seed, epoch, rank]).permutation(shard_len)


class BatchStream:
    """Endless stream of shard-local index batches of `batch` rows; `steps_per_epoch` per epoch.

    Only the first steps_per_epoch * batch rows of each epoch's order are used, so every rank
    takes the same number of steps per epoch (the smallest shard decides).
    """

    def __init__(self, shard_len, batch, steps_per_epoch, seed, rank, shuffle, epoch=0, step=0):
        self.shard_len, self.batch, self.steps_per_epoch = shard_len, batch, steps_per_epoch
        self.seed, self.rank, self.shuffle = seed, rank, shuffle
        self.epoch, self.step_in_epoch = epoch, step
        self._order = epoch_order(shard_len, seed, epoch, rank, shuffle)

    def next(self) -> tuple[int, np.ndarray]:
        """Return (epoch, indices) of the next batch and advance."""
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
            self._order = epoch_order(self.shard_len, self.seed, self.epoch, self.rank,
                                      self.shuffle)
        lo = self.step_in_epoch * self.batch
        self.step_in_epoch += 1
        return self.epoch, self._order[lo:lo + self.batch]

    def position(self) -> dict:
        """Return the state that resumes this stream exactly: epoch and step within it."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}


class Prefetcher:
    """Load the next batch in a background thread while the current one is computed on."""

    def __init__(self, shard, stream: BatchStream, to_device):
        self.shard, self.stream, self.to_device = shard, stream, to_device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpifed-load")
        self._lock = threading.Lock()
        self._next = self._pool.submit(self._load)
        self.wait_seconds = 0.0

    def _load(self):
        with self._lock:
            epoch, index = self.stream.next()
        x, y = self.shard.rows(index)
        return epoch, self.to_device(x), self.to_device(y)

    def get(self):
        """Return (epoch, x, y) of the next batch; time spent blocked adds to wait_seconds."""
        import time

        start = time.perf_counter()
        epoch, x, y = self._next.result()
        if hasattr(self.to_device, "wait"):  # device copies: the compute stream waits for them
            self.to_device.wait()
        self.wait_seconds += time.perf_counter() - start
        self._next = self._pool.submit(self._load)
        return epoch, x, y

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
