"""The block-shuffled order of a streamed shard: blocks in random order, rows shuffled in a buffer.

A shard read from its file is cut into blocks of `data.shuffle_block` rows at file rows that are
multiples of the block size (so a block of chunk rows is one HDF5 chunk), clipped to the shard.
Each epoch visits the blocks in a permutation drawn from (seed, epoch, rank); consecutive groups of
`data.shuffle_buffer` blocks of that permutation fill the buffer, whose rows are permuted by
(seed, epoch, rank, group + 1). The epoch order is the buffers' shuffled rows one after another,
so it is a permutation of the shard's rows that any process can recompute: a resumed run and a
serial reference see the same order (the idea of tf.data's shuffle buffer and of WebDataset's
shard shuffling, made reproducible).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

CONTIGUOUS_BLOCK_ROWS = 4096  # default block of a contiguous (unchunked) dataset
BUFFER_SHARE = 8  # the buffer stays under 1/8 of MPIFED_SHARD_MEMORY_BYTES ...
MAX_BUFFER_BYTES = 256 << 20  # ... and 256 MiB, so that filling the first one is quick ...
MIN_BUFFER_BLOCKS = 4  # ... but mixes at least this many blocks, however small the limit


def block_edges(start: int, stop: int, block: int) -> np.ndarray:
    """Return the shard-local edges of the blocks of file rows [start, stop): (blocks + 1,) int64.

    Blocks are cut at file rows that are multiples of `block`, so the first and last block of a
    shard may be short.
    """
    inner = np.arange((start // block + 1) * block, stop, block, dtype=np.int64)
    return np.concatenate([[start], inner, [stop]]).astype(np.int64) - start if stop > start \
        else np.zeros(1, dtype=np.int64)


def default_block(chunks) -> int:
    """Return data.shuffle_block's default: the dataset's rows per chunk, or 4096 if contiguous."""
    return int(chunks[0]) if chunks else CONTIGUOUS_BLOCK_ROWS


def default_buffer(block: int, row_bytes: int, memory_bytes: int) -> int:
    """Return data.shuffle_buffer's default in blocks: under a share of the shard memory limit."""
    budget = min(memory_bytes // BUFFER_SHARE, MAX_BUFFER_BYTES)
    return max(MIN_BUFFER_BLOCKS, budget // max(1, block * row_bytes))


@dataclass(frozen=True)
class BlockPlan:
    """How one shard is streamed: its block edges and the buffer size in blocks."""

    edges: np.ndarray  # (blocks + 1,) shard-local row edges
    buffer: int  # blocks per buffer

    @classmethod
    def of(cls, start: int, stop: int, block: int, buffer: int) -> BlockPlan:
        return cls(block_edges(start, stop, block), buffer)

    @property
    def blocks(self) -> int:
        return len(self.edges) - 1

    @property
    def groups(self) -> int:
        return -(-self.blocks // self.buffer)

    def block_order(self, seed: int, epoch: int, rank: int) -> np.ndarray:
        """Return the epoch's permutation of block numbers."""
        return np.random.default_rng([seed, epoch, rank]).permutation(self.blocks)

    def group_blocks(self, order: np.ndarray, group: int) -> np.ndarray:
        """Return the block numbers that fill buffer `group`, in reading order."""
        return order[group * self.buffer:(group + 1) * self.buffer]

    def group_rows(self, blocks: np.ndarray) -> np.ndarray:
        """Return the shard-local rows of `blocks`, block after block (the buffer's layout)."""
        return np.concatenate([np.arange(self.edges[b], self.edges[b + 1]) for b in blocks])

    def group_shuffle(self, rows: int, seed: int, epoch: int, rank: int, group: int) -> np.ndarray:
        """Return the permutation of a buffer's `rows` rows that draws its batches."""
        return np.random.default_rng([seed, epoch, rank, group + 1]).permutation(rows)

    def group_sizes(self, order: np.ndarray) -> np.ndarray:
        """Return the rows of each buffer of an epoch: (groups,) int64."""
        lengths = np.diff(self.edges)[order]
        return np.add.reduceat(lengths, np.arange(0, self.blocks, self.buffer)) if self.blocks \
            else np.zeros(0, dtype=np.int64)

    def epoch_order(self, seed: int, epoch: int, rank: int) -> np.ndarray:
        """Return the whole epoch's shard-local row order (a permutation of the shard's rows)."""
        order = self.block_order(seed, epoch, rank)
        parts = []
        for group in range(self.groups):
            rows = self.group_rows(self.group_blocks(order, group))
            parts.append(rows[self.group_shuffle(len(rows), seed, epoch, rank, group)])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
