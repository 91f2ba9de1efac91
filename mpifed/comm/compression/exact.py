"""comm.compression = "none": the exact all-reduce, the sum then a division by the rank count."""

from __future__ import annotations

from .base import Compressor


class ExactMean(Compressor):
    """The mean as every all-reduce of the package computes it with op="mean": the sum over
    the ranks, then one division by their count in the buffer's dtype (bit for bit)."""

    name = "none"

    def reduce_mean(self, grad, lo: int, allreduce_sum, world_size: int, step: int) -> None:
        sent = allreduce_sum(grad)
        if world_size > 1:
            self.xp.divide(grad, grad.dtype.type(world_size), out=grad)
        self.count(sent, sent)
