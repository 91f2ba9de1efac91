"""Half-precision wire formats as 16-bit patterns: pure array functions, no MPI.

Every format travels as uint16: MPI moves the bits, and neither NumPy nor CuPy has a bfloat16
dtype. fp16 is IEEE binary16 (the array module's own rounding, to nearest even); bf16 is the
top half of an IEEE binary32, rounded to nearest even here (as PyTorch's `to(bfloat16)`), NaN
kept NaN. Values wider than fp32 (float64 models) reach bf16 through fp32.
"""

from __future__ import annotations

from ...xp import get_array_module

WIRES = ("fp16", "bf16")


def encode(values, out, wire: str) -> None:
    """Write `values` (float32/64, 1-D) into `out` (uint16, same length) as `wire` bits."""
    if wire == "fp16":
        out.view("float16")[...] = values  # the cast writes straight into out: no temporary
    else:
        out[...] = bf16_bits(values)


def add_decoded(bits, wire: str, values) -> None:
    """Add the values of `bits` (uint16 in `wire`'s format) into `values` (float32/64) in
    place; the same sums as `values += decode(bits, wire, values.dtype)`, since widening a
    half-precision value is exact, without the full-size decoded copy (fp16)."""
    if wire == "fp16":
        values += bits.view("float16")  # the ufunc widens in cache-sized blocks
    else:
        values += decode(bits, wire, values.dtype)


def decode_into(bits, wire: str, values) -> None:
    """Write the values of `bits` (uint16 in `wire`'s format) into `values` (float32/64)."""
    if wire == "fp16":
        values[...] = bits.view("float16")
    else:
        values[...] = decode(bits, wire, values.dtype)


def decode(bits, wire: str, dtype):
    """Return the values of `bits` (uint16 in `wire`'s format) as a new `dtype` array."""
    if wire == "fp16":
        return bits.view("float16").astype(dtype)
    xp = get_array_module(bits)
    return (bits.astype(xp.uint32) << 16).view(xp.float32).astype(dtype, copy=False)


def bf16_bits(values):
    """Return bfloat16 bit patterns (uint16) of `values`, rounded to nearest, ties to even."""
    xp = get_array_module(values)
    bits = values.astype(xp.float32, copy=False).view(xp.uint32)
    rounding = ((bits >> 16) & 1) + 0x7FFF  # half an ulp of the kept bits, less one at even
    rounded = ((bits + rounding) >> 16).astype(xp.uint16)
    quiet_nan = ((bits >> 16) | 0x40).astype(xp.uint16)  # a NaN whose top half is not Inf
    return xp.where(xp.isnan(values), quiet_nan, rounded)
