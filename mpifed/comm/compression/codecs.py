"""Half-precision wire formats as 16-bit patterns: pure array functions, no MPI.

Every format travels as uint16: MPI moves the bits, and neither NumPy nor CuPy has a bfloat16
dtype. fp16 is IEEE binary16 (the array module's own rounding, to nearest even); bf16 is the
top half of an IEEE binary32, rounded to nearest even here (as PyTorch's `to(bfloat16)`), NaN
kept NaN. Values wider than fp32 (float64 models) reach bf16 through fp32.
"""

from __future__ import annotations

import numpy as np

from ...xp import get_array_module

WIRES = ("fp16", "bf16")


BLOCK = 1 << 14  # elements per block of the NumPy fp16 codec: its temporaries stay in cache


def encode(values, out, wire: str) -> None:
    """Write `values` (float32/64, 1-D) into `out` (uint16, same length) as `wire` bits."""
    if wire == "bf16":
        out[...] = bf16_bits(values)
    elif isinstance(values, np.ndarray) and values.dtype == np.float32:  # CuPy's cast is fast
        for lo in range(0, values.size, BLOCK):
            fp16_bits_of(values[lo:lo + BLOCK], out[lo:lo + BLOCK])
    else:
        out.view("float16")[...] = values  # float64 rounds once, straight to half


def add_decoded(bits, wire: str, values) -> None:
    """Add the values of `bits` (uint16 in `wire`'s format) into `values` (float32/64) in
    place: the same sums as `values += decode(bits, wire, values.dtype)` (widening a
    half-precision value is exact), without a full-size decoded copy for fp16."""
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


# NumPy's own float32 -> float16 cast takes ten times longer where the result is subnormal
# (gradients divided by the rank count mostly are): 6 s for a 46 M gradient on a loaded 2-core
# machine. This does the same rounding with integer and normal-float arithmetic only (after F.
# Giesen's float_to_half_fast3_rtne), in the same time whatever the values; the results are
# bitwise NumPy's, NaN payloads aside (a NaN stays a NaN, quiet, with its top payload bits).
# Widening half to float32 is left to NumPy: no faster this way for normal values.
_F16_MAX = np.uint32(143 << 23)  # 65536.0: from here up, half is infinite
_F16_NORMAL = np.uint32(113 << 23)  # 2**-14: below, half is subnormal or zero
_REBIAS = np.uint32((((15 - 127) << 23) + 0xFFF) & 0xFFFFFFFF)  # exponent 127 -> 15, round - 1
_HALF = np.array(126 << 23, np.uint32).view(np.float32)  # 0.5: its ulp is half's subnormal step


def fp16_bits_of(values, out) -> None:
    """Write IEEE half bits of float32 `values` into uint16 `out`, rounded to nearest even."""
    bits = values.view(np.uint32)
    sign = ((bits >> 16) & 0x8000).astype(np.uint16)
    mag = bits & np.uint32(0x7FFFFFFF)
    normal = (mag + _REBIAS + ((mag >> 13) & 1)) >> 13  # garbage outside the normal range
    with np.errstate(invalid="ignore"):  # NaN inputs: their garbage is replaced below
        small = (mag.view(np.float32) + _HALF).view(np.uint32) - _HALF.view(np.uint32)
    half = np.where(mag < _F16_NORMAL, small, normal)  # round the subnormals
    big = np.where(mag > np.uint32(0x7F800000), 0x7E00 | ((mag >> 13) & 0x3FF), 0x7C00)
    np.bitwise_or(np.where(mag >= _F16_MAX, big, half).astype(np.uint16), sign, out=out)
