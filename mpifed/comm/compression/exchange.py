"""The all-reduce a compressor is handed: a sum over the step's communicator that says what it
sent, so a compressor can count bytes without knowing which algorithm ran."""

from __future__ import annotations

from ..collectives import allreduce
from ..ring import ring_bytes_sent


class GradientSum:
    """`allreduce_sum` of the compressor protocol, over `comm` with `algorithm` (comm.allreduce).

    Bytes are counted as the package's ring sends them, for every algorithm: where the ring
    runs that is what it sent, for MPI's, NCCL's or the hierarchical all-reduce it is the
    ring-equivalent volume, 2(p-1)/p of the buffer.
    """

    def __init__(self, comm, algorithm: str):
        self.comm, self.algorithm = comm, algorithm

    def __call__(self, buf, algorithm: str | None = None) -> int:
        """Sum `buf` over the ranks in place (algorithm: the run's, or "ring" for the package's
        own); return the bytes this rank sent."""
        allreduce(buf, self.comm, "sum", algorithm or self.algorithm, check=False)
        return self.bytes_for(buf)

    def bytes_for(self, buf) -> int:
        """Return the bytes this rank sends when `buf` is summed over the ranks."""
        return ring_bytes_sent(buf.size, buf.itemsize, self.comm.size, self.comm.rank)
