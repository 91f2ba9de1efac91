"""Stochastic quantisation to a few bits, and the bit packing of its integers for the wire.

A value y in [-bound, bound] becomes an integer q in [0, L], L = 2^bits - 1, with
step = 2 bound / L:

    q = floor((y + bound) / step + u),   u ~ U[0, 1) drawn afresh for every coordinate

so E[q step - bound] = y (unbiased: the rounding goes up with probability equal to the
fraction it rounds over) and |q step - bound - y| < step. Values beyond the bound are first
saturated to it. The draws u come from the caller's generator, local to one institution: a
generator another party shares would let it predict the rounding, and the mean over parties
would no longer average out the errors.

The map is affine, so sums stay easy: K integer vectors summed decode as
step * sum(q) - K bound, the sum of the K decoded vectors.
"""

from __future__ import annotations

import numpy as np

from ..xp import get_array_module


def levels(bits: int) -> int:
    """Return L = 2^bits - 1, the largest integer of a `bits`-bit quantiser."""
    return (1 << bits) - 1


def step_of(bound: float, bits: int) -> float:
    """Return the quantiser's step 2 bound / L (0 when bound is 0: every value is 0)."""
    return 2.0 * bound / levels(bits)


def quantize(y, bound: float, bits: int, rng):
    """Return y (float64[n]) stochastically rounded to `bits` bits over [-bound, bound], as
    uint64[n] integers in [0, L]. rng: this institution's own source of uniform draws in
    [0, 1) (a NumPy Generator, or `rotated.SecureUniform`: anything with `.random(n)`)."""
    xp = get_array_module(y)
    step = step_of(bound, bits)
    if step <= 0:
        return xp.zeros(y.size, dtype=xp.uint64)  # bound 0: every value is 0, any q decodes so
    t = xp.clip(y, -bound, bound)
    t += bound
    t *= 1.0 / step
    t += xp.asarray(rng.random(y.size))
    np.floor(t, out=t)
    np.minimum(t, levels(bits), out=t)  # t == L + u rounds to L only: u < 1
    return t.astype(xp.uint64)


def dequantize(q, bound: float, bits: int, count: int = 1):
    """Return the real values of q (integers, or the sum of `count` parties' integers over one
    shared bound): q step - count bound, float64."""
    xp = get_array_module(q)
    out = q.astype(xp.float64)
    out *= step_of(bound, bits)
    out -= count * bound
    return out


def packed_bytes(count: int, bits: int) -> int:
    """Return the bytes of `count` integers of `bits` bits packed end to end."""
    return -(-count * bits // 8)


def _word(bits: int) -> np.dtype:
    """Return the little-endian unsigned dtype that holds `bits` bits."""
    for size in (1, 2, 4, 8):
        if bits <= 8 * size:
            return np.dtype(f"<u{size}")
    raise ValueError(f"at most 64 bits, got {bits}")


def pack(q, bits: int) -> np.ndarray:
    """Return the integers q (each < 2^bits) packed end to end, little-endian, as uint8.

    8 and 16 bits are plain casts; other widths keep the low `bits` of each value's bit row
    (uint8 work only: its bytes, unpacked, cut, packed again)."""
    q = np.asarray(q)
    word = _word(bits)
    if bits == 8 * word.itemsize:
        return q.astype(word).view(np.uint8)
    rows = np.unpackbits(q.astype(word).view(np.uint8).reshape(q.size, word.itemsize), axis=1,
                         bitorder="little")  # (count, 8 * itemsize)
    return np.packbits(rows[:, :bits].reshape(-1), bitorder="little")


def unpack(buf, bits: int, count: int) -> np.ndarray:
    """Return `count` integers (uint64) from `pack`'s bytes."""
    buf = np.asarray(buf, dtype=np.uint8)
    word = _word(bits)
    if bits == 8 * word.itemsize:
        return buf[:packed_bytes(count, bits)].view(word).astype(np.uint64)
    rows = np.zeros((count, 8 * word.itemsize), dtype=np.uint8)
    rows[:, :bits] = np.unpackbits(buf, count=count * bits, bitorder="little").reshape(count,
                                                                                      bits)
    return np.packbits(rows, axis=1, bitorder="little").view(word).reshape(-1).astype(np.uint64)
