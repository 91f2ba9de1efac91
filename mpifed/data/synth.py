"""Writers of datasets: a learnable synthetic set of any size, and the handwritten digits."""

from __future__ import annotations

import gzip
import importlib.util
import os
from pathlib import Path

import h5py
import numpy as np

from ..errors import UserError, check_memory, check_output_path
from .atomic import atomic_path

BLOCK_ROWS = 1 << 16
CHUNK_BYTES = 1 << 20  # chunks of about 1 MiB: whole rows, read as one piece when streaming


def chunk_rows(features: int, itemsize: int, samples: int) -> int:
    """Return the rows per chunk that make a chunk of whole rows about CHUNK_BYTES (at least 1)."""
    return max(1, min(samples, CHUNK_BYTES // max(1, features * itemsize)))


def check_disk(out: str, nbytes: int, what: str) -> None:
    """Refuse to start a file of `nbytes` that the disk holding `out` cannot take; note a big one.

    The check runs before anything is written, so a full disk never leaves half a dataset (the
    writer's temporary file would be removed, but only after minutes of writing)."""
    import shutil

    from ..log import get_logger

    log = get_logger(__name__)
    folder = os.path.dirname(os.path.abspath(out))
    free = shutil.disk_usage(folder if os.path.isdir(folder) else ".").free
    size = f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.1f} MB"
    if nbytes > free:
        raise UserError(f"{what}: the file would take {size}, but {folder!r} has "
                        f"{free / 1e9:.1f} GB free; use fewer --samples or another folder")
    if nbytes >= 1e9:
        log.warning("writing %s to %r (%s free there)", size, out, f"{free / 1e9:.1f} GB")


def write_synthetic(out: str, samples: int, features: int, classes: int, seed: int = 0,
                    noise: float = 1.0, progress=None, force: bool = False) -> None:
    """Write a Gaussian-blobs classification set (x float32, y int64), streamed in blocks.

    Class centres are drawn once from `seed`; each row is its class centre plus N(0, noise^2), so
    a linear model can learn it. Memory stays at one block whatever `samples` is.
    """
    if samples < 1 or features < 1 or classes < 2:
        raise UserError(f"need --samples >= 1, --features >= 1, --classes >= 2 "
                        f"(got {samples}, {features}, {classes})")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    check_output_path(out, "out", force, is_folder=False)
    check_memory((classes + 2 * min(samples, BLOCK_ROWS)) * features * 4,
                 f"--features {features}", "use fewer --features")
    check_disk(out, samples * (features * 4 + 8), f"--samples {samples} --features {features}")
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


def write_synthetic_images(out: str, samples: int, shape, classes: int, seed: int = 0,
                           noise: float = 1.0, progress=None, force: bool = False) -> None:
    """Write image-shaped classes: x (samples, C, H, W) float32, y int64, streamed in blocks.

    Each class owns a small pattern (C, k, k), k = min(5, H, W), drawn once from `seed`; a sample
    is N(0, noise^2) pixels with its class's pattern added at a uniformly random place. The place
    varies, so no fixed pixel weighting (a linear model) finds the class as well as a
    convolution, which sees the pattern wherever it is.
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3 or min(shape) < 1 or samples < 1 or classes < 2:
        raise UserError(f"need --shape C,H,W of positive sizes, --samples >= 1, --classes >= 2 "
                        f"(got {','.join(map(str, shape))}, {samples}, {classes})")
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    check_output_path(out, "out", force, is_folder=False)
    c, h, w = shape
    check_memory(min(samples, BLOCK_ROWS) * c * h * w * 4 * 2, f"--shape {c},{h},{w}",
                 "use a smaller --shape")
    check_disk(out, samples * (c * h * w * 4 + 8), f"--samples {samples} --shape {c},{h},{w}")
    k = min(5, h, w)
    patterns = np.random.default_rng(seed).standard_normal((classes, c, k, k)).astype(np.float32)
    patterns *= 3.0
    with atomic_path(out) as tmp, h5py.File(tmp, "w") as fh:
        rows = max(1, min(samples, (1 << 20) // (c * h * w)))
        dx = fh.create_dataset("x", (samples, c, h, w), dtype="float32", chunks=(rows, c, h, w))
        dy = fh.create_dataset("y", (samples,), dtype="int64", chunks=(min(samples, 4096),))
        fh.attrs["num_classes"] = classes
        block = max(1, min(BLOCK_ROWS, (256 << 20) // (4 * c * h * w)))
        for lo in range(0, samples, block):
            hi = min(samples, lo + block)
            rng = np.random.default_rng([seed, lo, 1])
            y = rng.integers(0, classes, size=hi - lo)
            x = noise * rng.standard_normal((hi - lo, c, h, w), np.float32)
            top = rng.integers(0, h - k + 1, size=hi - lo)
            left = rng.integers(0, w - k + 1, size=hi - lo)
            n = np.arange(hi - lo)[:, None, None, None]
            ch = np.arange(c)[None, :, None, None]
            rows_at = (top[:, None] + np.arange(k))[:, None, :, None]  # (n, 1, k, 1)
            cols_at = (left[:, None] + np.arange(k))[:, None, None, :]  # (n, 1, 1, k)
            x[n, ch, rows_at, cols_at] += patterns[y]  # (n, C, k, k)
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


def write_digits(out_dir: str, test_fraction: float = 0.2, seed: int = 0,
                 force: bool = False) -> tuple[str, str]:
    """Write OUT_DIR/train.h5 and OUT_DIR/test.h5 (a seeded, class-stratified split)."""
    if seed < 0:
        raise UserError(f"--seed must be >= 0, got {seed}")
    check_output_path(out_dir, "out_dir", force, is_folder=True)
    for name in ("train.h5", "test.h5"):
        check_output_path(os.path.join(out_dir, name), "out_dir", force, is_folder=False)
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
        write_arrays(path, x[order], y[order], num_classes=10, input_shape=[1, 8, 8])
        paths.append(path)
    return paths[0], paths[1]


def write_arrays(path: str, x, y, num_classes: int | None = None, input_shape=None) -> None:
    """Write arrays as datasets `x` and `y` of a new HDF5 file (atomically), x in ~1 MiB chunks
    of whole rows.

    input_shape: written as the attribute that reshapes each row of a 2-D x, e.g. [1, 8, 8].
    """
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        row = int(np.prod(x.shape[1:]))
        rows = chunk_rows(row, x.dtype.itemsize, len(x)) if len(x) else 0
        fh.create_dataset("x", data=x, chunks=(rows, *x.shape[1:]) if rows else None)
        fh.create_dataset("y", data=y)
        if num_classes is not None:
            fh.attrs["num_classes"] = num_classes
        if input_shape is not None:
            fh.attrs["input_shape"] = np.asarray(input_shape, dtype=np.int64)
