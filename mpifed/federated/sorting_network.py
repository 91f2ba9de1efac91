"""Sorting networks over K rows: per-column order statistics for the robust rules, fast.

NumPy sorts along axis 0 of a (K, n) array one short column at a time: at K = 11 and n =
535,818 float32, np.sort takes about 0.19 s and np.argsort 0.48 s. A sorting network applies one
fixed list of comparators to every column at once instead: comparator (i, j) is an elementwise
xp.minimum / xp.maximum of rows i and j, whole-row operations that vectorise. The network is
Batcher's odd-even merge sort for K padded to a power of two; comparators touching a padded wire
are dropped (padding acts as +inf, which never moves), and so are those no wanted output reads.
On the host the rows go through in column blocks that stay in cache; on a GPU (CuPy) whole, each
operation one kernel.

Outputs are exactly xp.sort's values, since min and max pick values and compute none (only the
sign of a zero may differ: min(-0.0, 0.0) may return either). A NaN is not ordered as xp.sort
orders it (last), so both functions return None when the rows hold one: the caller then takes
its xp.sort / xp.argsort path, which propagates NaN as Flower does.

Bulyan's "values nearest the median" sort (distance, value) pairs: a select on a data-dependent
mask is slow in NumPy (np.copyto(where=) 100x an xp.minimum), so that network swaps branch-free
on the floats' bits (`_compare_by_key`).
"""

from __future__ import annotations

import functools

from ..xp import get_array_module, is_device_array

BLOCK = 8192  # columns per block on the host: K + 1 rows of 32 KiB (float32) stay in L2


@functools.lru_cache(maxsize=64)
def batcher_pairs(count: int) -> tuple:
    """Return the comparators (i, j), i < j, of Batcher's odd-even merge sort on `count` wires:
    the network for the next power of two, less those that touch a wire >= count."""
    size = 1 << max(0, (count - 1).bit_length())
    pairs, p = [], 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        pairs.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((i, j) for i, j in pairs if j < count)


@functools.lru_cache(maxsize=64)
def network(count: int, wanted: tuple) -> tuple:
    """Return, in order, the comparators (i, j, low, high) that the sorted values on wires
    `wanted` depend on: low / high tell whether the min (wire i) / max (wire j) is read later."""
    live, kept = set(wanted), []
    for i, j in reversed(batcher_pairs(count)):
        low, high = i in live, j in live
        if low or high:
            kept.append((i, j, low, high))
            live |= {i, j}
    return tuple(reversed(kept))


def _block_width(row, n: int) -> int:
    """Return the columns per block: BLOCK on the host, all n on a GPU."""
    return n if is_device_array(row) else min(n, BLOCK)


def _load(work, rows, start: int, stop: int):
    """Copy columns [start, stop) of the K rows into work's first K rows; return them as a list
    of row views."""
    wires = [work[k, :stop - start] for k in range(len(rows))]
    for wire, row in zip(wires, rows):
        wire[...] = row[start:stop]
    return wires


def _compare(wires, comparators, spare) -> None:
    """Apply the comparators to the list of rows `wires` in place (the list, not the arrays,
    is permuted); `spare` is one more row of their shape, used as scratch."""
    xp = get_array_module(spare)
    for i, j, low, high in comparators:
        if low and high:
            xp.minimum(wires[i], wires[j], out=spare)
            xp.maximum(wires[i], wires[j], out=wires[j])
            wires[i], spare = spare, wires[i]
        elif low:
            xp.minimum(wires[i], wires[j], out=wires[i])
        else:
            xp.maximum(wires[i], wires[j], out=wires[j])


def order_statistics(rows, wanted):
    """Return the (len(wanted), n) array of xp.sort(stack(rows), axis=0)[list(wanted)], or None
    when the rows hold a NaN.

    rows: K arrays of shape (n,) (or a (K, n) array), not modified; wanted: 0-based ranks."""
    xp = get_array_module(rows[0])
    count, n, wanted = len(rows), rows[0].shape[0], tuple(wanted)
    comparators = network(count, wanted)
    dtype = xp.result_type(*rows)
    out = xp.empty((len(wanted), n), dtype=dtype)
    width = _block_width(rows[0], n)
    work = xp.empty((count + 1, width), dtype=dtype)
    for start in range(0, n, width):
        stop = min(n, start + width)
        wires = _load(work, rows, start, stop)
        if bool(xp.isnan(work[:count, :stop - start]).any()):
            return None
        _compare(wires, comparators, work[count, :stop - start])
        for r, wire in enumerate(wanted):
            out[r, start:stop] = wires[wire]
    return out


def _compare_by_key(keys, values, comparators, mask, scratch) -> None:
    """Apply the comparators to `values` ordered by `keys`, in place: rows of signed integers
    holding the bits of non-negative floats (which order as the floats do) and of the values.
    Branch-free, as a select on a random mask is 30-100x slower in NumPy: mask is all ones
    where key_j < key_i (the sign of key_j - key_i, which cannot overflow), and a conditional
    swap is t = (a ^ b) & mask, a ^= t, b ^= t. mask, scratch: integer rows of scratch."""
    xp = get_array_module(mask)
    sign = 8 * mask.dtype.itemsize - 1
    for i, j, low, high in comparators:
        xp.right_shift(xp.subtract(keys[j], keys[i], out=mask), sign, out=mask)
        for rows in (keys, values):
            xp.bitwise_and(xp.bitwise_xor(rows[i], rows[j], out=scratch), mask, out=scratch)
            if low:
                xp.bitwise_xor(rows[i], scratch, out=rows[i])
            if high:
                xp.bitwise_xor(rows[j], scratch, out=rows[j])


def nearest_values(rows, center, count_nearest: int):
    """Return the (count_nearest, n) array whose row r holds, per column, the value of the K
    rows with the r-th smallest |value - center|, as xp.take_along_axis(stacked,
    xp.argsort(|stacked - center|, axis=0)[:count_nearest], axis=0); None when a distance
    is NaN (a NaN value or center, or inf - inf).

    rows: K arrays of shape (n,) (or a (K, n) array), center: (n,); not modified. Two different
    values at exactly the same distance from the center may come in another order than
    argsort's. With the median of an even K as center, the two middle values often are (a
    tenth of the columns for random data), but they are the two nearest, ranks 0 and 1, so a
    mean over rows 0.. sums them first and a + b = b + a is exact. Any other tie needs two
    distances that round to the same float: rare, not impossible (one column of 535,818 for
    7 random float32 models); at the last wanted rank it may pick another value than argsort,
    whose order for ties NumPy leaves unspecified."""
    xp = get_array_module(rows[0])
    count, n = len(rows), rows[0].shape[0]
    comparators = network(count, tuple(range(count_nearest)))
    dtype = xp.result_type(*rows)
    out = xp.empty((count_nearest, n), dtype=dtype)
    width = _block_width(rows[0], n)
    work = xp.empty((2 * count + 2, width), dtype=dtype)  # values, keys, 2 rows of scratch
    bits = work.view(f"i{work.dtype.itemsize}")  # the same memory as integers
    out_bits = out.view(bits.dtype)
    for start in range(0, n, width):
        stop = min(n, start + width)
        w = stop - start
        values = _load(work, rows, start, stop)
        for k, value in enumerate(values):
            key = work[count + k, :w]
            xp.abs(xp.subtract(value, center[start:stop], out=key), out=key)
        if bool(xp.isnan(work[count:2 * count, :w]).any()):  # a NaN, or inf - inf
            return None
        _compare_by_key(list(bits[count:2 * count, :w]), list(bits[:count, :w]), comparators,
                        bits[2 * count, :w], bits[2 * count + 1, :w])
        out_bits[:, start:stop] = bits[:count_nearest, :w]
    return out
