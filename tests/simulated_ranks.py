"""p ranks in one process: one thread per rank, meeting in an all-reduce that sums in rank order.

For code that takes an `allreduce_sum(buf)` (the compressors), tested without mpiexec. Every
rank gets the same bytes, summed rank 0 first, so a serial reference can repeat the sum exactly.
"""

from __future__ import annotations

import threading


class SimulatedRanks:
    """`size` ranks; run(work) calls work(rank, allreduce_sum) on each in its own thread."""

    def __init__(self, size: int, timeout: float = 60.0):
        self.size = size
        self._bufs = [None] * size
        self._barrier = threading.Barrier(size, timeout=timeout)  # a missing rank fails, not hangs

    def allreduce_sum(self, rank: int):
        """Return rank `rank`'s all-reduce: sum `buf` in place over every rank."""
        def allreduce_sum(buf):
            self._bufs[rank] = buf
            self._barrier.wait()  # every rank's buffer is in
            total = self._bufs[0].copy()
            for other in self._bufs[1:]:
                if other.shape != buf.shape or other.dtype != buf.dtype:
                    raise ValueError(f"simulated all-reduce: rank {rank} has {buf.shape} "
                                     f"{buf.dtype}, another {other.shape} {other.dtype}")
                total += other
            self._barrier.wait()  # every rank has summed before any buffer changes
            buf[...] = total
        return allreduce_sum

    def run(self, work) -> list:
        """Run work(rank, allreduce_sum) on every rank at once; return the results by rank."""
        results, errors = [None] * self.size, []

        def one(rank):
            try:
                results[rank] = work(rank, self.allreduce_sum(rank))
            except BaseException as exc:  # noqa: BLE001 (re-raised below, in the caller)
                errors.append((rank, exc))
                self._barrier.abort()  # the others stop waiting for this rank

        threads = [threading.Thread(target=one, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        real = [e for e in errors if not isinstance(e[1], threading.BrokenBarrierError)]
        if real or errors:
            rank, exc = (real or errors)[0]
            raise RuntimeError(f"simulated rank {rank} failed: {exc!r}") from exc
        return results
