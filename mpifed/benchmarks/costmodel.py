"""The alpha-beta(-gamma) cost model of an all-reduce, measured on this machine.

alpha: seconds per message (latency), beta: seconds per byte moved, gamma: seconds per byte
reduced. A ring all-reduce of S bytes on p ranks sends 2(p-1) messages per rank carrying
2(p-1)/p * S bytes and reduces (p-1)/p * S bytes (Thakur, Rabenseifner and Gropp 2005):

    T_ring(p, S) = 2(p-1) alpha + 2(p-1)/p S beta + (p-1)/p S gamma

A hierarchical all-reduce over n nodes of L ranks adds the shared-memory reduction inside a node
(measured) to rings of S/L bytes across the n nodes. With a step's compute time T_c (measured on
one rank), weak-scaling efficiency is T_c / (T_c + T_allreduce(p)) when nothing overlaps.

TwoLevelModel describes what ring.py and hierarchical.py do on nodes linked by a network, from
a link inside a node and a link between nodes (alpha, and beta per buffer size: a buffer that
stays in cache moves faster than one streamed from memory) and the host's memory bandwidth:

    T_ring(n x L, S) = 2(nL-1) (alpha_slowest + S/(nL) beta_slowest(S))
    T_hier(n x L, S) = t_node + R * bytes(S) / B(S) + T_ring(n x 1, S/L)

bytes(S) (node_bytes) counts what one rank reads and writes in the node phases, B(S) is the
host's memory bandwidth at that buffer size, R the ranks sharing it (every rank of the job
where the nodes are emulated on one host), t_node the node phases' fixed cost.
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


LATENCY_BYTES = 16 << 10  # at or below this size a ring's time is its messages' fixed costs
FRESH_PAGES_BYTES = 32 << 20  # glibc's largest mmap threshold: arrays this big get new pages


def curve_at(points, nbytes: float) -> float:
    """Interpolate ((size, value), ...) linearly in log(size) at `nbytes`, constant past the ends."""
    sizes = np.log([p[0] for p in points])
    return float(np.interp(np.log(max(nbytes, 1.0)), sizes, [p[1] for p in points]))


@dataclass(frozen=True)
class Link:
    """One kind of link: alpha (s per message), beta (s per byte, the reduction included).

    curve: ((buffer bytes, beta), ...) where the per-byte cost depends on the buffer's size
    (cache-resident buffers move faster than ones streamed from memory); empty: beta everywhere.
    """

    alpha: float
    beta: float
    curve: tuple = ()

    def beta_at(self, nbytes: float) -> float:
        """Seconds per byte for a ring over a buffer of `nbytes`."""
        return curve_at(self.curve, nbytes) if self.curve else self.beta


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


def fit_sized_link(sizes, seconds, ranks: int = 2) -> Link:
    """Fit alpha over all sizes (fit_link), then beta at each size where bytes dominate.

    beta(S) = (T(S) - 2(p-1) alpha) / (2(p-1)/p S) at every size whose byte term is at least
    the messages' fixed cost; the curve interpolates between them (Link.beta_at).
    """
    line = fit_link(sizes, seconds, ranks)
    fixed = 2 * (ranks - 1) * line.alpha
    curve = tuple((float(s), (t - fixed) / (2 * (ranks - 1) / ranks * s))
                  for s, t in zip(sizes, seconds) if t >= 2 * fixed and s > LATENCY_BYTES)
    return Link(line.alpha, line.beta, curve)


@dataclass(frozen=True)
class Memory:
    """A host's memory: bytes/s (reads plus writes, all of its ranks together) per buffer size.

    curve: ((buffer bytes, host bytes/s), ...); the ranks on one host share it. fixed: seconds of
    the node phase that do not grow with the size (the fences, the Python around them).
    """

    curve: tuple
    fixed: float = 0.0

    def seconds(self, bytes_per_rank: float, host_ranks: int, nbytes: float) -> float:
        """Time for `host_ranks` ranks each moving `bytes_per_rank` on buffers of `nbytes`."""
        return host_ranks * bytes_per_rank / curve_at(self.curve, nbytes)


def node_bytes(nodes: int, per_node: int, nbytes: float, arrays: str = "window") -> float:
    """Bytes one rank reads plus writes in the hierarchical all-reduce's node phases.

    Ordinary arrays are copied into the shared window and back (2 copies of S: 4S). One node:
    each rank sums its slice of S/L from the L segments into a cached block and writes it into
    the L segments (reads S, writes S). Several nodes: the slice's sum goes into a new array of
    S/L (reads S, writes S/L; from FRESH_PAGES_BYTES up the kernel zeroes new pages first: S/L
    more), the ring between nodes runs on it, and it is written into the L segments (reads S/L,
    writes S).
    """
    copies = 4.0 * nbytes if arrays == "ordinary" else 0.0
    if nodes == 1:
        return copies + 2.0 * nbytes
    piece = nbytes / per_node
    fresh = piece if piece >= FRESH_PAGES_BYTES else 0.0
    return copies + 2.0 * nbytes + 2.0 * piece + fresh


@dataclass(frozen=True)
class TwoLevelModel:
    """A machine of nodes: `intra` is the link inside a node, `inter` the link between nodes.

    memory: the host's memory bandwidth, for the hierarchical all-reduce's node phases (without
    it those phases are a ring over the intra-node link, as in the first version of this model).
    shared_link: the L rings between nodes share one link (a NIC); False where each connection
    is driven by its own core (TCP over loopback).
    """

    intra: Link
    inter: Link
    memory: Memory | None = None
    shared_link: bool = False

    def ring(self, nodes: int, per_node: int, nbytes: float) -> float:
        """Predicted seconds of the flat ring on nodes x per_node ranks (placed by block).

        2(p-1) steps of S/p bytes; every step waits for its slowest link, the inter-node one as
        soon as there are 2 nodes; beta is the link's at this buffer size.
        """
        ranks = nodes * per_node
        if ranks < 2:
            return 0.0
        link = self.inter if nodes > 1 else self.intra
        return 2 * (ranks - 1) * (link.alpha + nbytes / ranks * link.beta_at(nbytes))

    def hierarchical(self, nodes: int, per_node: int, nbytes: float, arrays: str = "window",
                     host_ranks: int | None = None) -> float:
        """Predicted seconds of the hierarchical all-reduce on nodes x per_node ranks.

        The node phases' bytes (node_bytes) through the host's memory, shared by `host_ranks`
        ranks (default: the node's), plus their fixed cost, plus the ring of S/L bytes between
        the nodes (the L rings run at once; with shared_link they share the link: L times the
        bytes per link).
        """
        if per_node == 1:
            return self.ring(nodes, 1, nbytes)
        if self.memory is None:
            return self.ring(1, per_node, nbytes) + self.ring(nodes, 1, nbytes / per_node)
        host = host_ranks or per_node
        inside = self.memory.fixed + self.memory.seconds(
            node_bytes(nodes, per_node, nbytes, arrays), host, nbytes)
        piece = nbytes / per_node
        between = self.ring(nodes, 1, piece)
        if self.shared_link and nodes > 1:
            between += 2 * (nodes - 1) / nodes * piece * self.inter.beta_at(piece) * (per_node - 1)
        return inside + between

    def predict(self, algorithm: str, nodes: int, per_node: int, nbytes: float,
                arrays: str = "window", host_ranks: int | None = None) -> float:
        """Predicted seconds of `algorithm` ("ring" or "hierarchical")."""
        if algorithm == "hierarchical":
            return self.hierarchical(nodes, per_node, nbytes, arrays, host_ranks)
        return self.ring(nodes, per_node, nbytes)

    def to_json(self) -> dict:
        """Return the model as JSON-ready data (from_json reads it back)."""
        def link(k):
            return {"alpha": k.alpha, "beta": k.beta, "curve": [list(p) for p in k.curve]}
        memory = self.memory and {"curve": [list(p) for p in self.memory.curve],
                                  "fixed": self.memory.fixed}
        return {"intra": link(self.intra), "inter": link(self.inter), "memory": memory,
                "shared_link": self.shared_link}

    @classmethod
    def from_json(cls, data: dict) -> TwoLevelModel:
        """Rebuild a model from to_json's data (older files: two links only)."""
        def link(d):
            return Link(d["alpha"], d["beta"], tuple(tuple(p) for p in d.get("curve", ())))
        mem = data.get("memory")
        memory = mem and Memory(tuple(tuple(p) for p in mem["curve"]), mem.get("fixed", 0.0))
        return cls(link(data["intra"]), link(data["inter"]), memory or None,
                   bool(data.get("shared_link", False)))
