"""A shared-seed random rotation of a flat update: the randomized Hadamard transform H D.

D is a diagonal of random signs drawn from (run.seed, round) — every institution and the root
draw the same — and H the orthonormal Walsh-Hadamard matrix, applied in O(d log d) by the
fast transform. The vector is cut into blocks of a power of two (`block_size`: as large as
keeps the padding within an eighth of the length) and the last block padded with zeros, so the
rotation is block-diagonal:
still orthogonal, so it keeps the L2 norm (a DP clip bound holds unchanged after it) and the
sum (it is linear). Its use: after it every coordinate is a +-1 mix of a whole block, so the
coordinates are of one size, about ||x|| / sqrt(block), and a quantiser's uniform range fits
them all (Suresh et al. 2017, "Distributed mean estimation with limited communication").
The signs are public: the rotation hides nothing, it only spreads.

    >>> signs = rotation_signs(seed=5, round_index=0, size=1000)   # float64[1024]
    >>> y = rotate(x, signs)              # float64[1024], ||y|| == ||x||
    >>> x_again = unrotate(y, signs, 1000)
"""

from __future__ import annotations

import functools

import numpy as np

from ..xp import get_array_module

BLOCK = 1 << 20  # the largest block: the work is O(d log BLOCK)
MIN_BLOCK = 256  # the smallest block of a long vector (a shorter one is one block)
PADDING = 8  # a long vector's padding stays within 1/PADDING of its length
FACTOR = 64  # the largest Hadamard factor fwht multiplies by (64 x 64: BLAS-sized, cheap)
SIGNS_TAG = 0x726F74  # "rot": keeps this stream apart from the run's other seeded draws


def rotated_size(size: int) -> int:
    """Return the rotated length of a `size`-long vector: whole blocks of `block_size(size)`."""
    block = block_size(size)
    return -(-max(size, 1) // block) * block


def block_size(size: int) -> int:
    """Return the rotation's block: the next power of two >= size when that is at most
    MIN_BLOCK, else the largest power of two in [MIN_BLOCK, BLOCK] whose whole blocks pad
    `size` by at most size / PADDING (MIN_BLOCK when none does).

    Large blocks spread best (one range fits all coordinates); small ones pad least: the
    benchmark MLP's 535,818 values would pad to 2^20 in one block (1.96x the bytes) and pad
    to 9 x 2^16 = 589,824 (1.10x) here."""
    whole = 1 << max(size - 1, 0).bit_length()
    if whole <= MIN_BLOCK:
        return whole
    block = min(BLOCK, whole)
    while block > MIN_BLOCK and -(-size // block) * block - size > size // PADDING:
        block //= 2
    return block


def rotation_signs(seed: int, round_index: int, size: int, xp=np) -> np.ndarray:
    """Return the round's random signs (+-1.0, rotated_size(size) of them), the same wherever
    (seed, round_index) are: every institution and the root draw them alike."""
    rng = np.random.default_rng([seed, round_index, SIGNS_TAG])
    signs = rng.integers(0, 2, rotated_size(size), dtype=np.int8) * 2.0 - 1.0
    return xp.asarray(signs)


def fwht(x) -> None:
    """Apply the orthonormal Walsh-Hadamard transform in place to each row of x, a C-contiguous
    (rows, n) float array with n a power of two. H is symmetric and H H = I: it is its own
    inverse.

    H_n is the Kronecker product of Hadamard matrices of at most FACTOR rows (Sylvester's
    H_(ab) = H_a (x) H_b), so each row, seen as a (f_1, ..., f_m) tensor, takes one small matrix
    product per axis: m passes over memory with BLAS doing O(n f) work each, instead of log2 n
    butterfly passes (several times slower in NumPy, whose passes are memory-bound)."""
    xp = get_array_module(x)
    rows, n = x.shape
    factors, left = [], n
    while left > 1:
        factors.append(min(FACTOR, left))
        left //= factors[-1]
    current, pre = x, rows
    for i, f in enumerate(factors):
        post = n // (f * int(np.prod(factors[:i], dtype=np.int64)))
        h = sylvester(f, xp, x.dtype)
        if post == 1:
            current = current.reshape(pre, f) @ h  # the last axis: one product (H symmetric)
        else:
            current = xp.matmul(h, current.reshape(pre, f, post))  # (pre, f, post)
        pre *= f
    if factors:
        x[...] = current.reshape(rows, n)
    x *= 1.0 / np.sqrt(n)


@functools.lru_cache(maxsize=32)
def _sylvester_host(f: int, dtype: str) -> np.ndarray:
    h = np.ones((1, 1), dtype=dtype)
    while h.shape[0] < f:
        h = np.block([[h, h], [h, -h]])
    return h


def sylvester(f: int, xp=np, dtype=np.float64):
    """Return Sylvester's (unnormalised, +-1) Hadamard matrix of f rows, f a power of two."""
    return xp.asarray(_sylvester_host(f, np.dtype(dtype).name))


def rotate(x, signs):
    """Return H D x (float64[len(signs)]): x (length <= len(signs)) padded with zeros, times the
    signs, through the Hadamard transform block by block."""
    xp = get_array_module(x)
    y = xp.zeros(signs.size, dtype=xp.float64)
    y[:x.size] = x.reshape(-1)
    y *= signs
    fwht(y.reshape(-1, block_size(x.size)))
    return y


def unrotate(y, signs, size: int):
    """Return D H y cut to `size` (float64[size]): the inverse of `rotate` (H and D are their
    own inverses). y is left as it was."""
    x = y.astype(get_array_module(y).float64, copy=True)
    fwht(x.reshape(-1, block_size(size)))
    x *= signs
    return x[:size]
