"""Writers of datasets: a learnable synthetic set of any size, and the handwritten digits."""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError
from .atomic import atomic_path

BLOCK_ROWS = 1 << 16
CHUNK_BYTES = 1 << 20  # chunks of about 1 MiB: whole rows, read as one piece when streaming


def chunk_rows(features: int, itemsize: int, samples: int) -> int:
    """Return the rows per chunk that make a chunk of whole rows about CHUNK_BYTES (at least 1)."""
    return max(1, min(samples, CHUNK_BYTES // max(1, features * itemsize)))


def write_synthetic(out: str, samples: int, features: int, classes: int, seed: int = 0,
                    noise: float = 1.0, progress=None) -> None:
    """Write a Gaussian-blobs classification set (x float32, y int64), streamed in blocks.

    Class centres are drawn once from `seed`; each row is its class centre plus N(0, noise^2), so
    a linear model can learn it. Memory stays at one block whatever `samples` is.
    """
    if samples < 1 or features < 1 or classes < 2:
        raise UserError(f"need --samples >= 1, --features >= 1, --classes >= 2 "
                        f"(got {samples}, {features}, {classes})")
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)).astype(np.float32) * 2.0
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as fh:
        dx = fh.create_dataset("x", (samples, features), dtype="float32",
                               chunks=(chunk_rows(features, 4, samples), features))
        dy = fh.create_dataset("y", (samples,), dtype="int64",
                               chunks=(chunk_rows(1, 8, samples),))
        fh.attrs["num_classes"] = classes
        for lo in range(0, samples, BLOCK_ROWS):
            hi = min(samples, lo + BLOCK_ROWS)
            block_rng = np.random.default_rng([seed, lo])
            y = block_rng.integers(0, classes, size=hi - lo)
            x = centres[y] + noise * block_rng.standard_normal((hi - lo, features), np.float32)
            dx[lo:hi], dy[lo:hi] = x, y
            if progress:
                progress(hi, samples)


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Return the 1797 8x8 handwritten digits that scikit-learn ships: x in [0, 1], y in 0..9."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the digits set comes with scikit-learn, which is not installed; "
                        "pip install 'mpifed[demo]' (or scikit-learn)")
    path = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",")
    return (table[:, :-1] / 16.0).astype(np.float32), table[:, -1].astype(np.int64)


def write_digits(out_dir: str, test_fraction: float = 0.2, seed: int = 0) -> tuple[str, str]:
    """Write OUT_DIR/train.h5 and OUT_DIR/test.h5 (a seeded, class-stratified split)."""
    x, y = digits_arrays()
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        test_mask[members[:int(round(test_fraction * len(members)))]] = True
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for name, mask in (("train", ~test_mask), ("test", test_mask)):
        order = rng.permutation(np.flatnonzero(mask))  # mixed classes: shards see every digit
        path = os.path.join(out_dir, f"{name}.h5")
        write_arrays(path, x[order], y[order], num_classes=10)
        paths.append(path)
    return paths[0], paths[1]


def write_arrays(path: str, x, y, num_classes: int | None = None) -> None:
    """Write arrays as datasets `x` and `y` of a new HDF5 file (atomically), x in ~1 MiB chunks."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        rows = chunk_rows(x.shape[1], x.dtype.itemsize, len(x)) if len(x) else 0
        fh.create_dataset("x", data=x, chunks=(rows, x.shape[1]) if rows else None)
        fh.create_dataset("y", data=y)
        if num_classes is not None:
            fh.attrs["num_classes"] = num_classes
