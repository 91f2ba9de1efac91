"""Checks that every rank agrees on a buffer before a collective moves it.

A ring whose ranks disagree on the length hangs or truncates; one tiny `MPI_Allreduce` of the
(length, dtype) signature first turns that into the same `ValueError` on every rank.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

# Codes for the dtypes the collectives accept; the order is part of the wire format.
SUPPORTED_DTYPES = ("float16", "float32", "float64", "int32", "int64")
OPS = ("sum", "mean")
_ACCEPTED = frozenset(np.dtype(name) for name in SUPPORTED_DTYPES)  # hashable: a fast check


def check_local(buf, op: str) -> None:
    """Raise ValueError unless `buf` is a contiguous 1-D array of a supported dtype and op is known."""
    if op not in OPS:
        raise ValueError(f"op={op!r} is not supported; use one of {OPS}")
    if getattr(buf, "ndim", None) == 1 and buf.flags.c_contiguous and buf.dtype in _ACCEPTED \
            and (op == "sum" or buf.dtype.kind == "f"):
        return  # the hot path: every step passes here
    if getattr(buf, "ndim", None) != 1:
        raise ValueError(f"buffer must be a 1-D array, got shape {getattr(buf, 'shape', None)}; "
                         "flatten it or pack several arrays with mpifed.comm.fuse")
    if not buf.flags.c_contiguous:
        raise ValueError("buffer must be contiguous; pass a copy (xp.ascontiguousarray)")
    if buf.dtype.name not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype {buf.dtype.name} is not supported; use one of {SUPPORTED_DTYPES}")
    if op == "mean" and buf.dtype.kind != "f":
        raise ValueError(f"op='mean' needs a floating dtype, got {buf.dtype.name}; use op='sum'")


def check_buffer(buf, comm, op: str, check: bool) -> None:
    """check_local(buf, op), then check_same_signature over `comm` when `check` (collective)."""
    check_local(buf, op)
    if check:
        check_same_signature(comm, buf.size, buf.dtype)


def check_same_signature(comm, size: int, dtype) -> None:
    """Raise the same ValueError on every rank of `comm` unless all ranks agree on size and dtype."""
    code = SUPPORTED_DTYPES.index(np.dtype(dtype).name)
    local = np.array([size, -size, code, -code], dtype=np.int64)
    agreed = np.empty_like(local)
    comm.Allreduce(local, agreed, op=MPI.MAX)
    error = signature_error(agreed)
    if error:
        raise ValueError(error)


def signature_error(agreed) -> str | None:
    """Return the message for an agreed (max len, -min len, max dtype, -min dtype), or None."""
    longest, shortest = int(agreed[0]), -int(agreed[1])
    if longest != shortest:
        return (f"allreduce: ranks passed buffers of different lengths "
                f"({shortest} to {longest} elements); every rank must pass the same length")
    if agreed[2] != -agreed[3]:
        kinds = SUPPORTED_DTYPES[-int(agreed[3])], SUPPORTED_DTYPES[int(agreed[2])]
        return (f"allreduce: ranks passed buffers of different dtypes ({kinds[0]} and "
                f"{kinds[1]} among them); cast every rank's buffer to one dtype")
    return None
