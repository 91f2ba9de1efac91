"""Each rank's rows of an HDF5 dataset, read as one hyperslab (Heat's `load_hdf5` habit).

In a communicator of p ranks over N samples, rank r owns rows [floor(r*N/p), floor((r+1)*N/p)).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod

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
    input_shape: tuple[int, ...] = ()  # one sample's shape, e.g. (1, 8, 8); (features,) if flat

    def __post_init__(self):
        self.input_shape = tuple(self.input_shape) or (self.features,)


def sample_shape(dx, attr, name: str, path: str, key: str) -> tuple[int, ...]:
    """One sample's shape: x's trailing axes when N-D, else the `input_shape` attribute (which
    reshapes each row), else (features,)."""
    if dx.ndim > 2:
        return tuple(int(s) for s in dx.shape[1:])
    if attr is None:
        return (int(dx.shape[1]),)
    shape = tuple(int(s) for s in np.atleast_1d(attr))
    if not shape or min(shape) < 1 or prod(shape) != dx.shape[1]:
        raise UserError(f"{key}: the input_shape attribute {list(shape)} of {path!r} does not "
                        f"hold the {dx.shape[1]} features of each row of {name!r}; fix or "
                        "remove it")
    return shape


def open_hdf5(path: str, key: str, missing_hint: str) -> h5py.File:
    """Open `path` read-only, or raise UserError naming `key` (and `missing_hint` when the
    file does not exist)."""
    if not os.path.exists(path):
        raise UserError(f"{key}: file {path!r} does not exist; {missing_hint}")
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise UserError(f"{key}: {path!r} is not a readable HDF5 file ({err})") from None


def describe(path: str, x: str = "x", y: str = "y", key: str = "data.train") -> DatasetInfo:
    """Open `path` and check that `x` is numeric, 2-D (samples x features, each row maybe
    reshaped by an `input_shape` attribute) or N-D (samples, channels, height, width), and `y`
    1-D integer of the same length."""
    with open_hdf5(path, key, "check the path (relative paths are taken from the working "
                   "directory)") as fh:
        names = sorted(fh.keys())
        for name, which in ((x, "x"), (y, "y")):
            if name not in fh or not isinstance(_dataset(fh, name, path, key), h5py.Dataset):
                raise UserError(f"{key}: {path!r} has no dataset {name!r} (found: "
                                f"{', '.join(map(repr, names)) or 'nothing'}); set data.{which}")
        dx, dy = _dataset(fh, x, path, key), _dataset(fh, y, path, key)
        if dx.ndim < 2 or dx.dtype.kind not in "fiu":
            raise UserError(f"{key}: dataset {x!r} in {path!r} must be 2-D numeric "
                            f"(samples x features) or N-D (samples, channels, height, width), "
                            f"got shape {dx.shape} of {dx.dtype}")
        if dy.ndim != 1 or dy.dtype.kind not in "iu":
            raise UserError(f"{key}: dataset {y!r} in {path!r} must be 1-D integer labels, "
                            f"got shape {dy.shape} of {dy.dtype}")
        if dx.shape[0] != dy.shape[0]:
            raise UserError(f"{key}: {path!r} has {dx.shape[0]} rows in {x!r} but "
                            f"{dy.shape[0]} labels in {y!r}; they must match")
        if dx.shape[0] == 0 or prod(dx.shape[1:]) == 0:
            raise UserError(f"{key}: dataset {x!r} in {path!r} has shape {dx.shape}: no "
                            f"{'rows' if dx.shape[0] == 0 else 'features'}; give a file with data")
        for dataset in (dx, dy):
            check_virtual_sources(dataset, path, key)
        shape = sample_shape(dx, fh.attrs.get("input_shape"), x, path, key)
        return DatasetInfo(path, x, y, int(dx.shape[0]), prod(shape),
                           class_count(fh.attrs.get("num_classes"), path, key), shape)


MAX_CLASSES = 1 << 24


def class_count(value, path: str, key: str) -> int | None:
    """Return the `num_classes` attribute as an int >= 2, or None when absent; else UserError."""
    if value is None:
        return None
    number = np.asarray(value)
    ok = number.ndim == 0 and number.dtype.kind in "iuf" and np.isfinite(number) and \
        float(number) == int(number) and 2 <= int(number) <= MAX_CLASSES
    if not ok:
        raise UserError(f"{key}: attribute num_classes of {path!r} is {value!r}; it must be a "
                        f"whole number from 2 to {MAX_CLASSES} (or absent: max(y)+1)")
    return int(number)


def _dataset(fh, name: str, path: str, key: str):
    """Return fh[name]; a link to a missing file or object is a UserError naming it."""
    try:
        return fh[name]
    except KeyError as err:
        link = fh.get(name, getlink=True)
        target = f" to {link.filename!r}" if isinstance(link, h5py.ExternalLink) else ""
        raise UserError(f"{key}: {name!r} in {path!r} is a link{target} that cannot be opened "
                        f"({err}); restore the file it points to") from None


def check_virtual_sources(dataset, path: str, key: str) -> None:
    """Refuse a virtual dataset whose source files are missing (it would read its fill value)."""
    if not dataset.is_virtual:
        return
    folder = os.path.dirname(os.path.abspath(path))
    for source in dataset.virtual_sources():
        name = source.file_name
        if name == ".":
            continue
        full = name if os.path.isabs(name) else os.path.join(folder, name)
        if not os.path.exists(full):
            raise UserError(f"{key}: dataset {dataset.name!r} in {path!r} is virtual and its "
                            f"source file {name!r} is missing; restore it")


def file_identity(path: str) -> tuple:
    """Return what tells a file apart from a changed one: (device, inode, size, mtime_ns)."""
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Shard:
    """One rank's rows [start, stop) of a dataset: in memory, or read from the file per batch.

    Rows are held flat, (rows, features); the model reshapes them to its input shape.
    """

    def __init__(self, info: DatasetInfo, start: int, stop: int, dtype="float32"):
        self.info, self.start, self.stop = info, start, stop
        self.dtype = np.dtype(dtype)
        self._file = self._direct = None
        nbytes = (stop - start) * info.features * self.dtype.itemsize
        if nbytes <= shard_memory_bytes():
            self.x, self.y = self._read_rows(start, stop)
        else:
            self._file = h5py.File(info.path, "r")
            self._identity = file_identity(info.path)
            self.x = None
            self.y = self._read(self._file[info.y], slice(start, stop)).astype(np.int64)
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
                x[lo - start:hi - start] = self._read(dx, slice(lo, hi)).reshape(hi - lo, -1)
            y = self._read(fh[self.info.y], slice(start, stop)).astype(np.int64)
        return x, y

    def _read(self, dataset, rows):
        """Read dataset[rows]; a failed read (a corrupt chunk) is a UserError naming it."""
        try:
            return dataset[rows]
        except OSError as err:
            error = UserError(f"{self.info.path!r}: dataset {dataset.name!r} cannot be read "
                              f"({err}); the file is damaged, write it again")
            error.collective = False  # during training only this rank knows
            raise error from None

    def rows(self, local_index):
        """Return (x, y) for the shard-local row numbers `local_index` (host arrays)."""
        if self.x is not None:
            return self.x[local_index], self.y[local_index]
        if file_identity(self.info.path) != self._identity:  # one stat per batch
            error = UserError(f"{self.info.path!r} changed or was truncated while training read "
                              "it batch by batch; restore it and resume from the checkpoint")
            error.collective = False  # this rank alone sees it: abort the others
            raise error
        order = np.argsort(local_index)
        sorted_rows = local_index[order] + self.start
        x = self._read(self._file[self.info.x], sorted_rows)  # h5py wants increasing rows
        if x.shape[0] != len(local_index) or prod(x.shape[1:]) != self.info.features:
            error = UserError(f"{self.info.path!r}: a short read ({x.shape[0]} of "
                              f"{len(local_index)} rows); the file changed during training")
            error.collective = False
            raise error
        x = x.reshape(len(sorted_rows), -1).astype(self.dtype)
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
