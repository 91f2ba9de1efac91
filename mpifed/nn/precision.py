"""Compute precisions (`model.precision`): the dtype a model's forward and backward run in,
apart from the dtype its master parameters are stored in (`model.dtype`).

    "fp32"  compute in model.dtype itself (no copy, no loss scaling: the default)
    "fp16"  IEEE half (numpy.float16 / cupy.float16)
    "bf16"  bfloat16: `ml_dtypes.bfloat16` on the host, the same dtype in CuPy >= 14

On the host neither half has BLAS: NumPy multiplies float16 matrices in plain loops and
ml_dtypes' bfloat16 matmul answers in float32, so the half precisions there are for checking
correctness, not for speed. Sums of half values accumulate in float32 (`accumulator`): float16
overflows past 65504, and ml_dtypes adds bfloat16 values in bfloat16, where a running sum stops
growing once it is 256 times the term.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError

PRECISIONS = ("fp32", "fp16", "bf16")  # model.precision
HALF = ("fp16", "bf16")
CUPY_BF16 = 14  # the first CuPy major version with bfloat16 arrays


def accumulator(dtype):
    """Return the dtype that sums of `dtype` values accumulate in: float32 for the half
    precisions, else `dtype` itself."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize < 4 else dtype


def compute_dtype(precision: str, storage, xp=np):
    """Return the dtype forward and backward run in under `precision` with parameters stored as
    `storage` on array module `xp`; raise UserError naming what the backend lacks."""
    if precision == "fp32":
        return np.dtype(storage)
    if precision == "fp16":
        return np.dtype(np.float16)
    if precision != "bf16":
        raise UserError(f"model.precision: {precision!r} is not one of "
                        f"{', '.join(PRECISIONS)}")
    return _bfloat16(xp)


def _bfloat16(xp):
    """bfloat16 through ml_dtypes (NumPy) or CuPy >= 14."""
    try:
        import ml_dtypes
    except ImportError:
        raise UserError("model.precision = \"bf16\" needs the ml_dtypes package, which "
                        "provides bfloat16 to NumPy; pip install ml_dtypes (or "
                        "mpifed[half]), or set model.precision = \"fp16\"") from None
    if xp is not np:
        major = int(str(getattr(xp, "__version__", "0")).split(".")[0] or 0)
        if major < CUPY_BF16:
            raise UserError(f"model.precision = \"bf16\" on the GPU needs CuPy >= {CUPY_BF16} "
                            f"(bfloat16 arrays); this is CuPy {xp.__version__}: upgrade CuPy, "
                            "or set model.precision = \"fp16\"")
    return np.dtype(ml_dtypes.bfloat16)
