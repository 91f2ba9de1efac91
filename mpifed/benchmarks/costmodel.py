"""The alpha-beta(-gamma) cost model of an all-reduce, measured on this machine.

alpha: seconds per message (latency), beta: seconds per byte moved, gamma: seconds per byte
reduced. A ring all-reduce of S bytes on p ranks sends 2(p-1) messages per rank carrying
2(p-1)/p * S bytes and reduces (p-1)/p * S bytes (Thakur, Rabenseifner and Gropp 2005):

    T_ring(p, S) = 2(p-1) alpha + 2(p-1)/p S beta + (p-1)/p S gamma

A hierarchical all-reduce over n nodes of L ranks adds the shared-memory reduction inside a node
(measured) to rings of S/L bytes across the n nodes. With a step's compute time T_c (measured on
one rank), weak-scaling efficiency is T_c / (T_c + T_allreduce(p)) when nothing overlaps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI


@dataclass(frozen=True)
class CostModel:
    """Latency (s), inverse bandwidth (s/byte) and reduction cost (s/byte)."""

    alpha: float
    beta: float
    gamma: float

    def ring(self, ranks: int, nbytes: float) -> float:
        """Predicted seconds of a ring all-reduce of `nbytes` per rank over `ranks` ranks."""
        if ranks < 2:
            return 0.0
        share = (ranks - 1) / ranks
        return 2 * (ranks - 1) * self.alpha + 2 * share * nbytes * self.beta \
            + share * nbytes * self.gamma

    def hierarchical(self, nodes: int, per_node: int, nbytes: float, intra: float) -> float:
        """Predicted seconds with `intra` seconds inside a node, rings of nbytes/L across nodes."""
        return intra + self.ring(nodes, nbytes / per_node)

    def weak_efficiency(self, compute: float, comm: float) -> float:
        """Efficiency of a step of `compute` seconds that also waits `comm` seconds."""
        return compute / (compute + comm)


def pingpong(comm, nbytes: int, repeats: int = 200) -> float:
    """Return the one-way time (s) of an `nbytes` message between ranks 0 and 1 (others idle)."""
    buf = np.zeros(max(nbytes, 1), dtype=np.uint8)
    comm.Barrier()
    start = time.perf_counter()
    for _ in range(repeats):
        if comm.rank == 0:
            comm.Send(buf, 1, 7)
            comm.Recv(buf, 1, 7)
        elif comm.rank == 1:
            comm.Recv(buf, 0, 7)
            comm.Send(buf, 0, 7)
    elapsed = (time.perf_counter() - start) / (2 * repeats)
    return comm.bcast(elapsed, root=0)


def reduction_seconds_per_byte(nbytes: int = 8 << 20, repeats: int = 10) -> float:
    """Return the seconds per byte of `a += b` on float32 arrays (the reduction's own cost)."""
    a = np.ones(nbytes // 4, dtype=np.float32)
    b = np.ones_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a += b
        best = min(best, time.perf_counter() - start)
    return best / nbytes


def measure(comm) -> CostModel:
    """Measure alpha and beta by ping-pong between ranks 0 and 1 of `comm`, gamma locally."""
    if comm.size < 2:
        raise ValueError("measuring alpha and beta needs two ranks: mpiexec -n 2 ...")
    alpha = pingpong(comm, 8)
    big = 4 << 20
    beta = max(pingpong(comm, big, repeats=20) - alpha, 0.0) / big
    gamma = comm.allreduce(reduction_seconds_per_byte(), op=MPI.MAX)
    return CostModel(alpha, beta, gamma)


@dataclass(frozen=True)
class Link:
    """One kind of link: alpha (s per message) and beta (s per byte, the reduction included)."""

    alpha: float
    beta: float


def fit_link(sizes, seconds, ranks: int = 2) -> Link:
    """Fit alpha and beta of T = 2(p-1) alpha + 2(p-1)/p S beta to a ring's measured times.

    sizes: bytes per rank; seconds: the measured time at each size, on `ranks` ranks that all
    talk over this link. Least squares on relative error (every size weighs alike), coefficients
    kept non-negative.
    """
    s = np.asarray(sizes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    a = np.stack([np.full_like(s, 2.0 * (ranks - 1)), 2.0 * (ranks - 1) / ranks * s], axis=1)
    weighted = a / t[:, None]
    coef, *_ = np.linalg.lstsq(weighted, np.ones_like(t), rcond=None)
    alpha, beta = (max(float(c), 0.0) for c in coef)
    if beta == 0.0 or alpha == 0.0:  # refit the other one alone
        col = 0 if beta == 0.0 else 1
        one = np.linalg.lstsq(weighted[:, col:col + 1], np.ones_like(t), rcond=None)[0][0]
        alpha, beta = (max(float(one), 0.0), 0.0) if col == 0 else (0.0, max(float(one), 0.0))
    return Link(alpha, beta)


@dataclass(frozen=True)
class TwoLevelModel:
    """A machine of nodes: `intra` is the link inside a node, `inter` the link between nodes."""

    intra: Link
    inter: Link

    def ring(self, nodes: int, per_node: int, nbytes: float) -> float:
        """Predicted seconds of the flat ring on nodes x per_node ranks (placed by block).

        Every step waits for its slowest link: the inter-node one as soon as there are 2 nodes.
        """
        ranks = nodes * per_node
        if ranks < 2:
            return 0.0
        link = self.inter if nodes > 1 else self.intra
        return 2 * (ranks - 1) * link.alpha + 2 * (ranks - 1) / ranks * nbytes * link.beta

    def hierarchical(self, nodes: int, per_node: int, nbytes: float) -> float:
        """Predicted seconds of the hierarchical all-reduce: in the node, then rings of S/L."""
        inside = self.ring(1, per_node, nbytes)
        return inside + self.ring(nodes, 1, nbytes / per_node)

    def predict(self, algorithm: str, nodes: int, per_node: int, nbytes: float) -> float:
        """Predicted seconds of `algorithm` ("ring" or "hierarchical")."""
        if algorithm == "hierarchical" and per_node > 1:
            return self.hierarchical(nodes, per_node, nbytes)
        return self.ring(nodes, per_node, nbytes)
