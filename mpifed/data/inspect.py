"""`mpifed data inspect FILE`: shapes, dtypes, attributes and class counts of a dataset file,
and how its feature datasets are chunked for streaming (with a warning when the layout is slow).
"""

from __future__ import annotations

import time

import h5py
import numpy as np

from ..errors import UserError
from .blocks import default_block

SMALL_CHUNK_BYTES = 64 << 10  # below this, one read per chunk is mostly per-call overhead
LARGE_CHUNK_BYTES = 64 << 20  # above this, a block (one chunk) makes buffers huge
SLOW_READ_MB_S = 500  # a compressed file read slower than this can starve a training step
SAMPLE_BYTES = 16 << 20  # how much of a dataset the read-rate measurement reads


def inspect_lines(path: str, y_name: str = "y") -> list[str]:
    """Return a description of every dataset in `path`, and the class counts of `y_name`."""
    try:
        fh = h5py.File(path, "r")
    except (OSError, FileNotFoundError) as err:
        raise UserError(f"{path!r} is not a readable HDF5 file ({err})") from None
    lines = [f"{path}"]
    with fh:
        for key, value in fh.attrs.items():
            lines.append(f"  attribute {key} = {value}")

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  dataset {name}: shape {obj.shape}, dtype {obj.dtype}, "
                             f"chunks {obj.chunks}")
                if obj.ndim == 2 and obj.shape[0] and obj.shape[1]:
                    lines.extend("    " + line for line in streaming_lines(obj))

        fh.visititems(visit)
        if y_name in fh and fh[y_name].ndim == 1 and fh[y_name].dtype.kind in "iu":
            counts = np.zeros(0, dtype=np.int64)
            dy = fh[y_name]
            for lo in range(0, dy.shape[0], 1 << 20):  # streamed: fine for files of any size
                block = dy[lo:lo + (1 << 20)]
                if block.size and block.min() < 0:
                    lines.append(f"  {y_name} has negative labels")
                    return lines
                counts = np.pad(counts, (0, max(0, int(block.max(initial=-1)) + 1 - counts.size)))
                counts += np.bincount(block, minlength=counts.size)
            lines.append(f"  class counts of {y_name}: " +
                         ", ".join(f"{c}: {n}" for c, n in enumerate(counts)))
    return lines


def streaming_lines(dx: h5py.Dataset) -> list[str]:
    """Describe how a 2-D dataset streams (chunking, filters, read rate); warn if it is slow."""
    rows, features = dx.shape
    row_bytes = features * dx.dtype.itemsize
    filters = [f for f in ("compression", "shuffle", "fletcher32", "scaleoffset")
               if getattr(dx, f)]
    block = default_block(dx.chunks)
    if dx.chunks is None:
        lines = [f"streaming: contiguous; read in blocks of {block} rows (data.shuffle_block)"]
    else:
        lines = [f"streaming: chunks of {dx.chunks[0]} rows x {dx.chunks[1]} features "
                 f"({_size(int(np.prod(dx.chunks)) * dx.dtype.itemsize)}); read in blocks of "
                 f"{block} rows (data.shuffle_block)"]
    lines[0] += f", filters: {', '.join(_filter(dx, f) for f in filters) or 'none'}"
    rate = read_rate(dx)
    lines.append(f"streaming: reads {rate:,.0f} MB/s here ({rate * 1e6 / row_bytes:,.0f} rows/s "
                 "per rank reading alone; page cache as it is now)")
    return lines + [f"warning: {w}" for w in layout_warnings(dx, rate, filters)]


def layout_warnings(dx: h5py.Dataset, rate_mb_s: float, filters) -> list[str]:
    """Return why `dx`'s layout makes block-shuffled streaming slow (empty when it does not)."""
    rows, features = dx.shape
    row_bytes = features * dx.dtype.itemsize
    good = max(1, (1 << 20) // row_bytes)  # rows of a ~1 MiB chunk
    rewrite = (f"rewrite it with chunks of whole rows (`mpifed data partition FILE OUT "
               f"--institutions 1` writes {good}-row chunks)")
    if dx.chunks is None:
        return []
    out = []
    chunk_bytes = int(np.prod(dx.chunks)) * dx.dtype.itemsize
    if dx.chunks[1] < features:
        out.append(f"chunks split the {features} features into {-(-features // dx.chunks[1])} "
                   f"pieces: every row read touches that many chunks; {rewrite}")
    if chunk_bytes < SMALL_CHUNK_BYTES:
        out.append(f"chunks of {_size(chunk_bytes)} make many small reads; set "
                   f"data.shuffle_block to a multiple of {dx.chunks[0]} rows near 1 MiB "
                   f"({max(dx.chunks[0], good // dx.chunks[0] * dx.chunks[0])} rows), or {rewrite}")
    if chunk_bytes > LARGE_CHUNK_BYTES:
        out.append(f"chunks of {_size(chunk_bytes)}: every block read is a whole chunk, and a "
                   f"shuffle buffer holds several; {rewrite}")
    if "compression" in filters and rate_mb_s < SLOW_READ_MB_S:
        out.append(f"compressed ({_filter(dx, 'compression')}): decoding runs at "
                   f"{rate_mb_s:,.0f} MB/s, {rate_mb_s * 1e6 / row_bytes:,.0f} rows/s per rank; a "
                   "faster training step waits for it; store it uncompressed (h5repack -f NONE) "
                   "or keep shards in memory (MPIFED_SHARD_MEMORY_BYTES)")
    return out


def read_rate(dx: h5py.Dataset) -> float:
    """Return MB/s of reading whole blocks from the middle of `dx` (at most SAMPLE_BYTES)."""
    rows = dx.shape[0]
    block = min(rows, default_block(dx.chunks))
    row_bytes = dx.shape[1] * dx.dtype.itemsize
    count = max(1, min(rows // block, SAMPLE_BYTES // max(1, block * row_bytes)))
    first = (rows // 2) // block * block if rows >= 2 * count * block else 0
    began, nbytes = time.perf_counter(), 0
    for k in range(count):
        lo = min(first + k * block, rows - block)
        nbytes += dx[lo:lo + block].nbytes
    return nbytes / max(time.perf_counter() - began, 1e-9) / 1e6


def _filter(dx: h5py.Dataset, name: str) -> str:
    opts = dx.compression_opts if name == "compression" else None
    value = dx.compression if name == "compression" else name
    return f"{value} {opts}" if opts is not None else str(value)


def _size(nbytes: int) -> str:
    return f"{nbytes / (1 << 20):.2f} MiB" if nbytes >= 1 << 20 else f"{nbytes / 1024:.1f} KiB"
