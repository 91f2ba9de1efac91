"""comm.compression = "fp16" / "bf16": the gradients travel in half precision, summed in fp32.

The wire is the half-precision ring of comm/half_ring.py (each hop decodes, adds into the
float32 gradients, re-encodes), whatever comm.allreduce says; the loss and stop slots ride in
its last chunk as their own bits. Stateless: nothing to checkpoint.
"""

from __future__ import annotations

from ..half_ring import half_ring_allreduce_mean
from .base import Compressor


class HalfWire(Compressor):
    """Average over a half-precision ring. predivide: divide by the rank count before the sum
    (comm.predivide; else after it)."""

    wire = ""

    def __init__(self, blocks, *, xp, dtype, seed: int = 0, predivide: bool = True):
        super().__init__(blocks, xp=xp, dtype=dtype, seed=seed)
        self.predivide = predivide

    def reduce_mean(self, grad, lo: int, allreduce_sum, world_size: int, step: int) -> None:
        sent = half_ring_allreduce_mean(grad, allreduce_sum.comm, self.wire,
                                        predivide=self.predivide,
                                        exact_tail=self.exact_tail(grad, lo))
        self.count(sent, allreduce_sum.bytes_for(grad))


class Fp16Wire(HalfWire):
    """IEEE half precision on the wire (5 exponent bits: predivide keeps sums from overflowing
    past 65504)."""

    name = wire = "fp16"


class Bf16Wire(HalfWire):
    """bfloat16 on the wire: fp32's range, 8 bits of mantissa."""

    name = wire = "bf16"
