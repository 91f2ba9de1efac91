"""Each rank's rows given as NumPy arrays in Python: the in-memory twin of `shards.Shard`.

`mpifed.train.run(cfg, data=(x, y))` takes this rank's shard as arrays; `MemoryShard` offers
what the batch loader, the evaluation and the checks read of a file's shard (len, x, y, rows,
label_range, all_finite, info, dtype, start, stop), so the training loop has no special case.
"""

from __future__ import annotations

from math import prod

import numpy as np

from ..errors import UserError
from .shards import DatasetInfo

# data.train (data.test) in config.toml when the rows came as arrays: no file holds them.
ARRAYS = "<arrays>"

MAX_SAMPLE_AXES = 7  # one sample's axes (C, H, W is 3); the shape travels in an int64 buffer


def check_arrays(pair, key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (x, y) of `pair` as NumPy arrays once they make a shard; else a UserError naming
    `key` ("data", "test") and the fix.

    x: (rows, features) or (rows, C, H, W), numeric and finite; y: (rows,) integer labels >= 0.
    """
    if not isinstance(pair, (tuple, list)) or len(pair) != 2:
        raise UserError(f"{key}: expected a pair (x, y) of this rank's arrays, got "
                        f"{type(pair).__name__}; pass {key}=(x, y)")
    x, y = (np.asarray(a) for a in pair)
    if x.ndim < 2 or x.dtype.kind not in "fiu" or x.ndim - 1 > MAX_SAMPLE_AXES:
        raise UserError(f"{key}: x must be numeric of shape (rows, features) or (rows, C, H, "
                        f"W), got shape {x.shape} of {x.dtype}; reshape it or cast it to "
                        "float32")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise UserError(f"{key}: y must be 1-D integer labels, got shape {y.shape} of "
                        f"{y.dtype}; pass y.astype(np.int64) of one label per row")
    if len(x) != len(y):
        raise UserError(f"{key}: x has {len(x)} rows but y has {len(y)} labels; they must match")
    if prod(x.shape[1:]) == 0:
        raise UserError(f"{key}: x has shape {x.shape}: rows without features")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        bad = int(np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0])
        raise UserError(f"{key}: x has NaN or Inf (first in row {bad}); clean the data")
    if len(y) and int(y.min()) < 0:
        raise UserError(f"{key}: y has a negative label ({int(y.min())}); labels are 0, 1, ...")
    return x, y


def padded_shape(x: np.ndarray) -> tuple[int, ...]:
    """Return (axes, *sample shape, 0, ...): one sample's shape in MAX_SAMPLE_AXES + 1 ints."""
    shape = x.shape[1:]
    return (len(shape), *shape, *(0,) * (MAX_SAMPLE_AXES - len(shape)))


class MemoryShard:
    """One rank's rows [start, stop) of all ranks' `samples`, held as arrays.

    x is kept flat, (rows, features), in `dtype` (the model's), as `Shard` keeps a file's rows;
    y as int64. start: this rank's first row in the rank-order concatenation of every shard.
    """

    def __init__(self, x, y, start: int, samples: int, dtype="float32"):
        self.dtype = np.dtype(dtype)
        self.x = np.ascontiguousarray(np.asarray(x).reshape(len(x), -1), dtype=self.dtype)
        self.y = np.ascontiguousarray(y, dtype=np.int64)
        self.start, self.stop = start, start + len(self.y)
        self.info = DatasetInfo(ARRAYS, "x", "y", samples, self.x.shape[1], None,
                                tuple(np.shape(x)[1:]))

    def __len__(self) -> int:
        return self.stop - self.start

    def rows(self, local_index):
        """Return (x, y) for the shard-local row numbers `local_index` (host arrays)."""
        return self.x[local_index], self.y[local_index]

    def label_range(self) -> tuple[int, int]:
        """Return (min, max) label of this shard, or (0, -1) when it is empty."""
        return (int(self.y.min()), int(self.y.max())) if len(self) else (0, -1)

    def all_finite(self) -> bool:
        """Tell whether every feature value is finite (no NaN or Inf)."""
        return bool(np.isfinite(self.x).all())

    def x_chunks(self) -> None:
        """Arrays have no chunks (held whole, never streamed from a file)."""
        return None

    def close(self) -> None:
        pass
