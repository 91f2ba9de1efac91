"""The ring all-reduce with a half-precision wire (fp16 or bf16) and fp32 sums on every hop.

The ring of ring.py, but what travels is 16-bit: at each reduce step a rank encodes its partial
sum of one chunk, sends it right, and adds what arrives from the left, decoded, into its own
values (the accumulator: the float32 or float64 buffer itself), so a sum is rounded to half
precision once per hop, never added in it. The owner of each summed chunk encodes it once, and
the copy steps pass those bits around: every rank decodes the same bits, so all end bitwise
identical. A few trailing elements (the step's loss and stop slots) ride in the last chunk as
their own bits, 2 or 4 wire items each, and come back as their exact mean.

Messages are one Sendrecv per step (no segment pipelining as in ring.py): the wire halves the
bytes, which is the point where compression is worth having.
"""

from __future__ import annotations

from ..xp import get_array_module, is_device_array, synchronize, to_host
from .backend import cuda_aware
from .compression.codecs import add_decoded, decode_into, encode
from .ring import chunk_bounds, ring_order

_TAG = 7100  # apart from ring.py's tags (0 .. 2 size): the half ring never interleaves with it


def half_ring_allreduce_mean(values, comm, wire: str, *, predivide: bool = True,
                             exact_tail: int = 0) -> int:
    """Average `values` over `comm` in place on a `wire` ("fp16", "bf16") ring; return the
    bytes this rank sent.

    values: 1-D contiguous float32/float64 NumPy or CuPy array, the same length on every rank
    (not checked here: a step checks its buffer once). Its first size - exact_tail elements
    travel as `wire` bits; the last `exact_tail` as their own bits (summed, then divided).
    predivide: divide by comm.size before the sum (half precision overflows later), else
    after it, at the chunk's owner, before the copy steps.
    Device arrays stay on the device with a CUDA-aware MPI; otherwise the ring runs on a host
    copy (the wire is half precision either way).

    >>> half_ring_allreduce_mean(np.full(4, 1/3, np.float32), MPI.COMM_WORLD, "fp16")  # 2 ranks
    36    # bytes; every rank holds [0.33325195]*4, fp16's nearest to 1/3
    """
    if comm.size < 2 or values.size == 0:
        return 0
    if is_device_array(values) and not cuda_aware():
        host = to_host(values)
        sent = half_ring_allreduce_mean(host, comm, wire, predivide=predivide,
                                        exact_tail=exact_tail)
        values[...] = get_array_module(values).asarray(host)
        return sent
    return _HalfRing(values, comm, wire, exact_tail).run(predivide)


class _HalfRing:
    """One half-precision all-reduce: the element chunks, their places on the wire, the steps."""

    def __init__(self, values, comm, wire: str, exact_tail: int):
        xp = get_array_module(values)
        self.values, self.comm, self.wire = values, comm, wire
        self.m = values.size - exact_tail  # elements sent in half precision
        self.k = values.itemsize // 2  # wire items per exact element
        self.bits = xp.empty(self.m + exact_tail * self.k, dtype=xp.uint16)
        bounds = chunk_bounds(self.m, comm.size)
        bounds[-1] = (bounds[-1][0], values.size)  # the exact tail rides in the last chunk
        self.bounds, self.ring = bounds, ring_order(bounds)
        self.sent = 0

    def run(self, predivide: bool) -> int:
        values, m, size, rank = self.values, self.m, self.comm.size, self.comm.rank
        scale = values.dtype.type(size)
        if predivide:
            values[:m] /= scale
        for step in range(size - 1):  # reduce: rank r ends with ring chunk r+1 = bounds[r]
            send, recv = self.ring[(rank - step) % size], self.ring[(rank - step - 1) % size]
            self._pack(*send)
            self._exchange(send, recv, step)
            self._add(*recv)
        a, b = self.bounds[rank]
        values[max(a, m) if predivide else a:b] /= scale  # the tail always after its sum
        self._pack(a, b)
        for step in range(size - 1):  # copy: pass the owners' bits around
            send, recv = self.ring[(rank + 1 - step) % size], self.ring[(rank - step) % size]
            self._exchange(send, recv, size + step)
        decode_into(self.bits[:m], self.wire, values[:m])
        if values.size > m:
            values[m:] = self.bits[m:].copy().view(values.dtype)  # a copy: aligned for the view
        return self.sent

    def _span(self, a: int, b: int) -> tuple[int, int]:
        """The wire items of elements [a, b)."""
        m = self.m
        return a, b if b <= m else m + (b - m) * self.k

    def _pack(self, a: int, b: int) -> None:
        """Encode elements [a, b) onto their wire items."""
        m, values = self.m, self.values
        h = min(b, m)
        encode(values[a:h], self.bits[a:h], self.wire)
        if b > m:
            lo, hi = self._span(m, b)
            self.bits[lo:hi] = values[m:b].view(self.bits.dtype)

    def _add(self, a: int, b: int) -> None:
        """Add the wire items of elements [a, b), decoded, into the values (fp32 or wider)."""
        m, values = self.m, self.values
        h = min(b, m)
        add_decoded(self.bits[a:h], self.wire, values[a:h])
        if b > m:
            lo, hi = self._span(m, b)
            values[m:b] += self.bits[lo:hi].copy().view(values.dtype)

    def _exchange(self, send, recv, tag: int) -> None:
        """Send chunk `send`'s wire items right while receiving chunk `recv`'s from the left."""
        comm, size, rank = self.comm, self.comm.size, self.comm.rank
        s_lo, s_hi = self._span(*send)
        r_lo, r_hi = self._span(*recv)
        synchronize(self.bits)  # MPI reads device memory only once the encode has finished
        comm.Sendrecv(self.bits[s_lo:s_hi], (rank + 1) % size, _TAG + tag,
                      self.bits[r_lo:r_hi], (rank - 1) % size, _TAG + tag)
        self.sent += (s_hi - s_lo) * self.bits.itemsize
