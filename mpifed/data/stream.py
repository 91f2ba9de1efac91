"""Which rows each step reads: a rank's batch stream over its shard, and a prefetching loader.

A rank walks its shard in order, or in a fresh permutation per epoch seeded by (seed, epoch,
rank). A shuffled shard that is read from its file (larger than MPIFED_SHARD_MEMORY_BYTES) is
walked in block-shuffled order instead (mpifed/data/blocks.py): a reader thread reads whole blocks
a buffer ahead, and batches are drawn from the buffer. Either stream continues across epochs, and
its position (epoch, offset) is all the state a checkpoint needs to resume it.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from ..xp import background_thread, leave_signals_to_main_thread
from .blocks import BlockPlan, default_block, default_buffer
from .shards import shard_memory_bytes


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

    def next_rows(self, shard) -> tuple[int, np.ndarray, np.ndarray]:
        """Return (epoch, x, y) of the next batch of `shard` (host arrays) and advance."""
        epoch, index = self.next()
        x, y = shard.rows(index)
        return epoch, x, y

    def position(self) -> dict:
        """Return the state that resumes this stream exactly: epoch and step within it."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def close(self) -> None:
        pass


def shard_stream(shard, batch, steps_per_epoch, seed, rank, shuffle, epoch=0, step=0,
                 block=0, buffer=0, timeline=None):
    """Return the batch stream of `shard`: block-shuffled if it is shuffled and read from file.

    block, buffer: data.shuffle_block (rows) and data.shuffle_buffer (blocks); 0 picks the
    default (blocks.default_block, blocks.default_buffer). timeline: where block reads are traced.
    """
    # a token shard (data/tokens.py) reads each batch's windows itself: it has no blocks
    if not (shuffle and shard.x is None and hasattr(shard, "read_block")):
        return BatchStream(len(shard), batch, steps_per_epoch, seed, rank, shuffle, epoch, step)
    plan = stream_plan(shard, block, buffer)
    return BlockStream(shard, batch, steps_per_epoch, seed, rank, plan, epoch, step, timeline)


def stream_plan(shard, block: int = 0, buffer: int = 0) -> BlockPlan:
    """Return the block plan of a streamed shard, with defaults for a block or buffer of 0."""
    block = block or default_block(shard.x_chunks())
    row_bytes = shard.info.features * shard.dtype.itemsize
    buffer = buffer or default_buffer(block, row_bytes, shard_memory_bytes())
    return BlockPlan.of(shard.start, shard.stop, block, buffer)


class Buffer(NamedTuple):
    """One filled shuffle buffer: rows [start, stop) of an epoch's order."""

    epoch: int
    start: int  # offset of its first row in the epoch order
    stop: int
    x: np.ndarray  # (rows, features) its blocks' rows, block after block (memory reused)
    position: np.ndarray  # (rows,) the shuffle: row i of the order is x[position[i]]
    index: np.ndarray  # (rows,) the shard-local row numbers in shuffled order


class BlockStream:
    """Endless stream of batches of a file-backed shard in block-shuffled order.

    Same steps, epochs and position as BatchStream; its order is BlockPlan.epoch_order. Only the
    first steps_per_epoch * batch rows of each epoch's order are used, so buffers past them are
    never read.
    """

    def __init__(self, shard, batch, steps_per_epoch, seed, rank, plan: BlockPlan, epoch=0,
                 step=0, timeline=None):
        self.shard, self.batch, self.steps_per_epoch = shard, batch, steps_per_epoch
        self.epoch, self.step_in_epoch = epoch, step
        self._reader = BufferReader(shard, plan, (seed, rank), steps_per_epoch * batch,
                                    (epoch, step * batch), timeline)
        self._buffer = None

    def next_rows(self, shard=None) -> tuple[int, np.ndarray, np.ndarray]:
        """Return (epoch, x, y) of the next batch (host arrays) and advance."""
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        lo = self.step_in_epoch * self.batch
        hi = lo + self.batch
        self.step_in_epoch += 1
        xs, ys = [], []
        while lo < hi:
            buf = self._buffer
            if buf is None or (buf.epoch, buf.stop) <= (self.epoch, lo):
                buf = self._buffer = self._reader.get()
            if buf.epoch != self.epoch or not buf.start <= lo < buf.stop:
                raise RuntimeError(f"block stream out of step: needs row {lo} of epoch "
                                   f"{self.epoch}, got rows [{buf.start}, {buf.stop}) of "
                                   f"epoch {buf.epoch}")
            end = min(hi, buf.stop)
            xs.append(buf.x[buf.position[lo - buf.start:end - buf.start]])
            ys.append(self.shard.y[buf.index[lo - buf.start:end - buf.start]])
            lo = end
        if len(xs) == 1:
            return self.epoch, xs[0], ys[0]
        return self.epoch, np.concatenate(xs), np.concatenate(ys)

    def position(self) -> dict:
        """Return the state that resumes this stream exactly: epoch and step within it."""
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch}

    def close(self) -> None:
        self._reader.close()


class BufferReader:
    """A thread that fills shuffle buffers in stream order, reading each block whole.

    One filled buffer waits in the queue while the next is read, so reads run a buffer (several
    blocks) ahead of the batches. Errors reach the consumer through the queue. Three buffers'
    memory is reused in turn (the one drawn from, the one queued, the one being filled): group k
    is filled only after group k-1 was queued, so after the consumer took group k-2 and let go
    of group k-3, whose memory it takes (no page faults on fresh memory every buffer).
    """

    def __init__(self, shard, plan: BlockPlan, seed_rank, used_rows: int, first, timeline=None):
        if used_rows < 1:
            raise ValueError("a block stream needs at least one row per epoch")
        self.shard, self.plan, self.used_rows, self.timeline = shard, plan, used_rows, timeline
        self.seed, self.rank = seed_rank
        rows = int(min(plan.buffer * np.diff(plan.edges).max(initial=0), plan.edges[-1]))
        self._memory = [np.empty((rows, shard.info.features), dtype=shard.dtype)
                        for _ in range(3)]
        self._filled = 0  # buffers filled so far: the next one uses memory[filled % 3]
        self._queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread = background_thread(self._run, "mpifed-read", first)
        self._thread.start()

    def _run(self, epoch: int, first_row: int) -> None:
        try:
            while not self._stop.is_set():
                if not self._fill_epoch(epoch, first_row):
                    return
                epoch, first_row = epoch + 1, 0
        except BaseException as err:  # noqa: BLE001 -- handed to the consumer, raised there
            self._put(err)

    def _fill_epoch(self, epoch: int, first_row: int) -> bool:
        """Fill and hand over the buffers of `epoch` that hold rows [first_row, used_rows)."""
        plan = self.plan
        order = plan.block_order(self.seed, epoch, self.rank)
        ends = np.cumsum(plan.group_sizes(order))
        for group, (start, end) in enumerate(zip([0, *ends[:-1]], ends)):
            if end <= first_row:
                continue
            if start >= self.used_rows:
                break
            buf = self._fill(epoch, group, order, int(start), int(end))
            if buf is None or not self._put(buf):
                return False
        return True

    def _fill(self, epoch: int, group: int, order, start: int, stop: int):
        """Read the blocks of buffer `group` whole and draw its shuffle; None when stopped."""
        plan, shard = self.plan, self.shard
        blocks = plan.group_blocks(order, group)
        x = self._memory[self._filled % 3][:stop - start]
        self._filled += 1
        filled = 0
        for b in blocks:
            if self._stop.is_set():
                return None
            lo, hi = int(plan.edges[b]), int(plan.edges[b + 1])
            began = time.perf_counter()
            shard.read_block(lo, hi, x[filled:filled + hi - lo])
            if self.timeline is not None:
                self.timeline.read(began, time.perf_counter(), hi - lo, x[:hi - lo].nbytes)
            filled += hi - lo
        position = plan.group_shuffle(len(x), self.seed, epoch, self.rank, group)
        return Buffer(epoch, start, stop, x, position, plan.group_rows(blocks)[position])

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> Buffer:
        """Return the next filled buffer (waits for the reader); re-raise the reader's error."""
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the reader thread and wait for it."""
        self._stop.set()
        self._thread.join()


class Prefetcher:
    """Load the next batch in a background thread while the current one is computed on."""

    def __init__(self, shard, stream: BatchStream, to_device):
        self.shard, self.stream, self.to_device = shard, stream, to_device
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mpifed-load",
                                        initializer=leave_signals_to_main_thread)
        self._lock = threading.Lock()
        self._next = self._pool.submit(self._load)
        self.wait_seconds = 0.0

    def _load(self):
        with self._lock:
            epoch, x, y = self.stream.next_rows(self.shard)
        return epoch, self.to_device(x), self.to_device(y)

    def get(self):
        """Return (epoch, x, y) of the next batch; time spent blocked adds to wait_seconds."""
        start = time.perf_counter()
        epoch, x, y = self._next.result()
        if hasattr(self.to_device, "wait"):  # device copies: the compute stream waits for them
            self.to_device.wait()
        self.wait_seconds += time.perf_counter() - start
        self._next = self._pool.submit(self._load)
        return epoch, x, y

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.stream.close()
