"""`mpifed data from-numpy`: one's own NumPy arrays as the HDF5 contract that training reads.

    mpifed data from-numpy X.npy Y.npy OUT.h5 [--num-classes N]
    mpifed data from-numpy --npz FILE.npz OUT.h5            # arrays named x and y

The file holds dataset `x` (rows, features) or (rows, C, H, W) as given, float32 unless the
input is already floating point (its dtype is kept), in chunks of whole rows of about 1 MiB;
dataset `y` int64 labels; attribute `num_classes`. A .npy file is memory-mapped and copied in
row blocks, so memory stays at one block however large it is (an .npz member is read whole:
NumPy cannot map a member of a zip file).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from math import prod

import h5py
import numpy as np

from ..errors import UserError, check_output_path
from .atomic import atomic_path
from .shards import MAX_CLASSES
from .synth import chunk_rows

BLOCK_BYTES = 64 << 20  # rows copied at a time: a block of about this many bytes of x


@dataclass(frozen=True)
class Written:
    """What from-numpy wrote: rows, one sample's shape, x's dtype, the class count."""

    path: str
    samples: int
    sample_shape: tuple[int, ...]
    dtype: str
    num_classes: int


def load_npy(path: str, what: str) -> np.ndarray:
    """Return the array of the .npy file at `path`, memory-mapped (read as it is copied)."""
    if not os.path.isfile(path):
        raise UserError(f"{what} {path!r} does not exist; give the path of a .npy file "
                        "(np.save)")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserError(f"{what} {path!r} is not a NumPy .npy file of numbers ({err}); "
                        "save the array with np.save") from None


def load_npz(path: str) -> tuple[np.ndarray, np.ndarray]:
    """Return arrays `x` and `y` of the .npz file at `path`."""
    if not os.path.isfile(path):
        raise UserError(f"--npz {path!r} does not exist; give a file from np.savez(path, x=..., "
                        "y=...)")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise UserError(f"--npz {path!r} is not a NumPy .npz file ({err}); save it with "
                        "np.savez(path, x=..., y=...)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise UserError(f"--npz {path!r} holds one array, not x and y; give X.npy Y.npy instead "
                        "of --npz")
    with archive:
        missing = [name for name in ("x", "y") if name not in archive.files]
        if missing:
            raise UserError(f"--npz {path!r} has no array {missing[0]!r} (found: "
                            f"{', '.join(archive.files) or 'nothing'}); save it with "
                            "np.savez(path, x=features, y=labels)")
        try:
            return archive["x"], archive["y"]
        except ValueError as err:
            raise UserError(f"--npz {path!r}: {err}; save numbers, not objects") from None


def check_shapes(x, y, x_name: str, y_name: str) -> None:
    """Refuse arrays that cannot be a dataset; the message names the file and the fix."""
    if x.ndim < 2 or x.dtype.kind not in "fiub":
        raise UserError(f"{x_name}: features must be numeric of shape (rows, features) or "
                        f"(rows, C, H, W), got shape {x.shape} of {x.dtype}; reshape it "
                        "(x.reshape(len(x), -1)) or cast it (x.astype(np.float32))")
    if y.ndim != 1 or y.dtype.kind not in "iu":
        fix = "y.ravel()" if y.ndim > 1 else "y.astype(np.int64)"
        raise UserError(f"{y_name}: labels must be 1-D integers, got shape {y.shape} of "
                        f"{y.dtype}; save {fix}")
    if len(x) != len(y):
        raise UserError(f"{x_name} has {len(x)} rows but {y_name} has {len(y)} labels; give "
                        "one label per row")
    if len(x) == 0 or prod(x.shape[1:]) == 0:
        raise UserError(f"{x_name}: shape {x.shape} holds no data; give at least one row of "
                        "features")


def write_from_numpy(out: str, x, y, num_classes: int | None = None, force: bool = False,
                     names: tuple[str, str] = ("x", "y"), progress=None) -> Written:
    """Write arrays `x` and `y` (NumPy arrays or memory maps) as the HDF5 contract at `out`.

    Checks every row block as it is copied: finite features, labels >= 0 and below
    `num_classes` (when given; else max(y) + 1, at least 2). names: what messages call x and y
    (their files). The file appears whole or not at all (atomic_path).
    """
    x_name, y_name = names
    check_output_path(out, "OUT", force, is_folder=False)
    check_shapes(x, y, x_name, y_name)
    if num_classes is not None and not 2 <= num_classes <= MAX_CLASSES:
        raise UserError(f"--num-classes: {num_classes} is not from 2 to {MAX_CLASSES}")
    dtype = x.dtype if x.dtype.kind == "f" else np.dtype("float32")
    samples, shape = len(x), tuple(int(s) for s in x.shape[1:])
    row_bytes = prod(shape) * dtype.itemsize
    block = max(1, min(samples, BLOCK_BYTES // row_bytes))
    top = -1
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as fh:
        dx = fh.create_dataset("x", (samples, *shape), dtype=dtype,
                               chunks=(chunk_rows(prod(shape), dtype.itemsize, samples), *shape))
        dy = fh.create_dataset("y", (samples,), dtype="int64",
                               chunks=(chunk_rows(1, 8, samples),))
        for lo in range(0, samples, block):
            hi = min(samples, lo + block)
            xb, yb = np.asarray(x[lo:hi]), np.asarray(y[lo:hi])
            top = max(top, check_block(xb, yb, lo, names, num_classes))
            dx[lo:hi], dy[lo:hi] = xb.astype(dtype, copy=False), yb.astype(np.int64, copy=False)
            if progress:
                progress(hi, samples)
        classes = num_classes if num_classes is not None else top + 1
        if classes < 2:
            raise UserError(f"{y_name}: every label is {top}; a classifier needs at least two "
                            "classes (or give --num-classes)")
        fh.attrs["num_classes"] = classes
    return Written(out, samples, shape, dtype.name, classes)


def check_block(x, y, first: int, names: tuple[str, str], num_classes: int | None) -> int:
    """Check one block of rows (file rows first, first+1, ...); return its largest label."""
    x_name, y_name = names
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        if bad.any():
            raise UserError(f"{x_name}: row {first + int(np.flatnonzero(bad)[0])} has NaN or "
                            "Inf; clean the data (drop or impute those rows) and convert again")
    low, high = int(y.min()), int(y.max())
    if low < 0:
        row = first + int(np.flatnonzero(y < 0)[0])
        raise UserError(f"{y_name}: label {low} in row {row} is negative; labels are 0, 1, ..., "
                        "classes - 1 (remap them, e.g. np.unique(y, return_inverse=True)[1])")
    if num_classes is not None and high >= num_classes:
        row = first + int(np.flatnonzero(y >= num_classes)[0])
        raise UserError(f"{y_name}: label {high} in row {row} is out of range for "
                        f"--num-classes {num_classes}; raise --num-classes or leave it out "
                        "(max label + 1)")
    return high


def convert(out: str, x_path: str | None = None, y_path: str | None = None,
            npz: str | None = None, num_classes: int | None = None, force: bool = False,
            progress=None) -> Written:
    """Write OUT from X.npy and Y.npy, or from the arrays x and y of an .npz file."""
    check_output_path(out, "OUT", force, is_folder=False)  # before reading any input
    if npz is not None:
        x, y = load_npz(npz)
        names = (f"{npz!r} array 'x'", f"{npz!r} array 'y'")
    else:
        x, y = load_npy(x_path, "X"), load_npy(y_path, "Y")
        names = (repr(x_path), repr(y_path))
    return write_from_numpy(out, x, y, num_classes, force, names, progress)
