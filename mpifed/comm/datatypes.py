"""16-bit floats on any MPI: raw 16-bit words on the wire, their sums in the package's own code.

MPICH has a half-precision datatype (MPIX_C_FLOAT16) and sums it itself; Open MPI 4.1 has none,
and no MPI has one for bfloat16 that mpi4py maps. So:
- messages that only move bytes (the ring's sends and receives, all-gathers) carry every 2-byte
  float as uint16, on every MPI: the bits arrive unchanged, and one path serves all libraries;
- reductions inside the MPI library (MPI_Allreduce, MPI_Reduce_scatter) use the library's own
  type where mpi4py maps the dtype, else an MPI user operation that adds the uint16 words as the
  dtype they hold. NumPy adds two float16 values in float32 and rounds once, which is the
  correctly rounded half-precision sum (float32 has more than 2 x 11 + 2 bits), as a native
  half type gives.

`MPIFED_MPI_HALF=0` takes the user-operation path on an MPI that has the type: the tests run
Open MPI's path under MPICH so, and it is the way round an MPI whose half type is broken.
"""

from __future__ import annotations

import functools
import os

import numpy as np
from mpi4py import MPI


def is_half(dtype) -> bool:
    """Tell whether `dtype` is a 16-bit float (float16, or bfloat16 from ml_dtypes)."""
    dtype = np.dtype(dtype)
    return dtype.itemsize == 2 and dtype.kind not in "iub"


def wire(array):
    """Return `array` as MPI should move it: 16-bit floats viewed as uint16, others unchanged.

    A view, not a copy (NumPy or CuPy): a receive into it fills `array`.
    """
    if array.dtype.itemsize == 2 and array.dtype.kind not in "iub":
        return array.view(np.uint16)
    return array


@functools.cache
def mpi_sums(dtype) -> bool:
    """Tell whether the MPI library can sum `dtype` itself (it has the datatype, and
    MPIFED_MPI_HALF is not "0" for a 16-bit float).

    Read once per dtype and process; `mpi_sums.cache_clear()` rereads.
    """
    dtype = np.dtype(dtype)
    if is_half(dtype) and os.environ.get("MPIFED_MPI_HALF", "").strip() == "0":
        return False
    from mpi4py.util.dtlib import from_numpy_dtype

    try:
        datatype = from_numpy_dtype(dtype)  # a duplicate: usable, or MPI says it is not
    except (KeyError, ValueError, TypeError, MPI.Exception):
        # MPI.Exception: mpi4py's wheel names MPI.FLOAT16_T for Open MPI, which Open MPI 4.1
        # (libmpi.so.40, as Debian ships it) does not have: MPI_ERR_TYPE on first use
        return False
    if datatype == MPI.DATATYPE_NULL:
        return False
    datatype.Free()
    return True


def reduction(array) -> tuple:
    """Return `(buffer, op)` for an MPI sum of `array`: `(array, MPI.SUM)` where the library
    sums the dtype itself, else `(array viewed as uint16, a user operation that adds the words
    as array.dtype)`, which reads host memory only (stage device arrays through host_view)."""
    if mpi_sums(array.dtype):
        return array, MPI.SUM
    return wire(array), _adder(array.dtype)


@functools.cache
def _adder(dtype) -> MPI.Op:
    """Return a commutative MPI user operation: inout += in, both read as `dtype`.

    Made once per dtype and process; MPI_Finalize frees it.
    """
    def add(inbuf, inoutbuf, datatype):
        into = np.frombuffer(inoutbuf, dtype=dtype)
        np.add(into, np.frombuffer(inbuf, dtype=dtype), out=into)

    return MPI.Op.Create(add, commute=True)
