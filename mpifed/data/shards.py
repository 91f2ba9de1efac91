"""Each rank's rows of an HDF5 dataset, read as one hyperslab (Heat's `load_hdf5` habit).

In a communicator of p ranks over N samples, rank r owns rows [floor(r*N/p), floor((r+1)*N/p)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import h5py
import numpy as np

from ..errors import UserError
from .direct import DirectRows

# A shard larger than this many bytes is not held in memory: batches are read from the file.
SHARD_MEMORY_BYTES = 8 << 30  # default of MPIFED_SHARD_MEMORY_BYTES


def shard_memory_bytes() -> int:
    """Return the largest shard held in memory: MPIFED_SHARD_MEMORY_BYTES, read when asked."""
    value = os.environ.get("MPIFED_SHARD_MEMORY_BYTES")
    return int(value) if value else SHARD_MEMORY_BYTES
READ_BLOCK_ROWS = 1 << 16


def shard_bounds(samples: int, ranks: int, rank: int) -> tuple[int, int]:
    """Return (start, stop) of the rows that `rank` of `ranks` owns among `samples` rows."""
    return (rank * samples) // ranks, ((rank + 1) * samples) // ranks


@dataclass
class DatasetInfo:
    """What a dataset file holds, checked: path, dataset names, sizes, class count (or None)."""

    path: str
    x: str
    y: str
    samples: int
    features: int
    num_classes: int | None  # from the file attribute; None means max(y)+1, found collectively


def describe(path: str, x: str = "x", y: str = "y", key: str = "data.train") -> DatasetInfo:
    """Open `path` and check that `x` is 2-D float and `y` is 1-D integer of the same length."""
    if not os.path.exists(path):
        raise UserError(f"{key}: file {path!r} does not exist; check the path "
                        "(relative paths are taken from the working directory)")
    try:
        fh = h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{key}: {path!r} is not a readable HDF5 file ({err})") from None
    with fh:
        names = sorted(fh.keys())
        for name, which in ((x, "x"), (y, "y")):
            if name not in fh or not isinstance(fh[name], h5py.Dataset):
                raise UserError(f"{key}: {path!r} has no dataset {name!r} (found: "
                                f"{', '.join(map(repr, names)) or 'nothing'}); set data.{which}")
        dx, dy = fh[x], fh[y]
        if dx.ndim != 2 or dx.dtype.kind not in "fiu":
            raise UserError(f"{key}: dataset {x!r} in {path!r} must be 2-D numeric "
                            f"(samples x features), got shape {dx.shape} of {dx.dtype}")
        if dy.ndim != 1 or dy.dtype.kind not in "iu":
            raise UserError(f"{key}: dataset {y!r} in {path!r} must be 1-D integer labels, "
                            f"got shape {dy.shape} of {dy.dtype}")
        if dx.shape[0] != dy.shape[0]:
            raise UserError(f"{key}: {path!r} has {dx.shape[0]} rows in {x!r} but "
                            f"{dy.shape[0]} labels in {y!r}; they must match")
        classes = fh.attrs.get("num_classes")
        return DatasetInfo(path, x, y, int(dx.shape[0]), int(dx.shape[1]),
                           None if classes is None else int(classes))


class Shard:
    """One rank's rows [start, stop) of a dataset: in memory, or read from the file per batch."""

    def __init__(self, info: DatasetInfo, start: int, stop: int, dtype="float32"):
        self.info, self.start, self.stop = info, start, stop
        self.dtype = np.dtype(dtype)
        self._file = self._direct = None
        nbytes = (stop - start) * info.features * self.dtype.itemsize
        if nbytes <= shard_memory_bytes():
            self.x, self.y = self._read_rows(start, stop)
        else:
            self._file = h5py.File(info.path, "r")
            self.x = None
            self.y = self._file[info.y][start:stop].astype(np.int64)
            dx = self._file[info.x]
            self._direct = DirectRows(info.path, dx) if DirectRows.usable(dx, self.dtype) else None

    def __len__(self) -> int:
        return self.stop - self.start

    def _read_rows(self, start: int, stop: int):
        """Read rows [start, stop) as one hyperslab, block by block to bound the temporary."""
        x = np.empty((stop - start, self.info.features), dtype=self.dtype)
        with h5py.File(self.info.path, "r") as fh:
            dx = fh[self.info.x]
            for lo in range(start, stop, READ_BLOCK_ROWS):
                hi = min(stop, lo + READ_BLOCK_ROWS)
                x[lo - start:hi - start] = dx[lo:hi]
            y = fh[self.info.y][start:stop].astype(np.int64)
        return x, y

    def rows(self, local_index):
        """Return (x, y) for the shard-local row numbers `local_index` (host arrays)."""
        if self.x is not None:
            return self.x[local_index], self.y[local_index]
        order = np.argsort(local_index)
        sorted_rows = local_index[order] + self.start
        x = self._file[self.info.x][sorted_rows].astype(self.dtype)  # h5py wants increasing rows
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        return x[inverse], self.y[local_index]

    def read_block(self, lo: int, hi: int, out) -> None:
        """Read shard-local rows [lo, hi) of a file-backed shard into `out` (hi-lo, features).

        By file offset where the layout allows (mpifed/data/direct.py), else one hyperslab
        converted to the shard's dtype by HDF5 (no temporary).
        """
        if self._direct is not None and self._direct.read(self.start + lo, self.start + hi, out):
            return
        self._file[self.info.x].read_direct(out, np.s_[self.start + lo:self.start + hi])

    def x_chunks(self) -> tuple | None:
        """Return the chunk shape of the features dataset, or None if it is contiguous."""
        if self._file is not None:
            return self._file[self.info.x].chunks
        with h5py.File(self.info.path, "r") as fh:
            return fh[self.info.x].chunks

    def label_range(self) -> tuple[int, int]:
        """Return (min, max) label of this shard, or (0, -1) when it is empty."""
        return (int(self.y.min()), int(self.y.max())) if len(self) else (0, -1)

    def all_finite(self) -> bool:
        """Tell whether every feature value of this shard is finite (no NaN or Inf)."""
        if self.x is not None:
            return bool(np.isfinite(self.x).all())
        dx = self._file[self.info.x]
        return all(np.isfinite(dx[lo:min(self.stop, lo + READ_BLOCK_ROWS)]).all()
                   for lo in range(self.start, self.stop, READ_BLOCK_ROWS))

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
        if self._file is not None:
            self._file.close()
