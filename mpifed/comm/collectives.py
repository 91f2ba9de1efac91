"""`allreduce`, `reduce_scatter` and `allgather`: entry points that pick the ring, the
hierarchical scheme or the MPI library's own algorithm."""

from __future__ import annotations

import functools
import os

import numpy as np
from mpi4py import MPI

from ..choices import ALGORITHMS  # comm.allreduce: named where MPI is not needed
from ..xp import is_device_array
from .autotune import bucket_bytes, installed
from .checks import SUPPORTED_DTYPES, check_local, signature_error
from .hierarchical import (
    hierarchical_allgather,
    hierarchical_allreduce,
    hierarchical_reduce_scatter,
)
from .native import mpi_allgather, mpi_allreduce, mpi_reduce_scatter
from .ring import ring_allgather, ring_allreduce, ring_reduce_scatter
from .shared import window_of
from .topology import topology

# Below RING_MIN_BYTES * (ranks - 1) bytes MPI_Allreduce wins: latency-bound, one C call beats
# 2(ranks - 1) Python-driven messages, and the ring's latency grows with the rank count. Above it
# the ring wins. Measured with `mpifed bench allreduce -f 2` with MPICH 5.0.2 on a 2-core machine:
# crossover between 256 KiB and 1 MiB on 2 ranks, between 1 and 2 MiB on 4 (docs/performance.md,
# "All-reduce"). MPIFED_RING_MIN_BYTES moves it for other machines (read at the first choice).
RING_MIN_BYTES = 512 * 1024
# With several ranks on a node, the hierarchical all-reduce from this size up: below it, its two
# node barriers cost more than MPI_Allreduce's whole call (crossover 16-32 KiB on 2 and 4 ranks).
# MPIFED_HIERARCHICAL_MIN_BYTES moves it.
HIERARCHICAL_MIN_BYTES = 32 * 1024
# Ordinary (non-window) arrays, several ranks on each of several nodes: the hierarchical
# all-reduce copies the array into its window and back (2 extra passes over memory), which pays
# only where the bytes between nodes cost more than those passes: it sends 1/L of them per rank
# where the flat ring sends them all. Measured with `mpifed bench allreduce --arrays ordinary` on
# 2 nodes x 2 ranks over TCP (docs/performance.md, "Several nodes"), the flat ring was faster at
# 4-64 MiB on both machines we have (1.3-1.4x on a quiet 16-core host, 1.1-1.2x on the 2-core
# VM), so "auto" never takes that path by default; MPIFED_HIERARCHICAL_COPY_MIN_BYTES=N turns it
# on from N bytes for networks slower than their nodes' memory.
HIERARCHICAL_COPY_MIN_BYTES = 1 << 62  # off


@functools.cache
def _threshold(name: str, default: int) -> int:
    """Return the byte threshold `name` from the environment, else `default`.

    Read once per process, at the first choice (an environment read costs a few microseconds
    on a busy machine, as much as a small MPI_Allreduce); `_threshold.cache_clear()` and
    `_smallest_threshold.cache_clear()` reread.
    """
    value = os.environ.get(name)
    return int(value) if value else default


def choose_algorithm(nbytes: int, ranks: int, per_node: int = 1, *, device: bool = False,
                     nccl: bool = False, window: bool = True, nodes: int | None = None,
                     table: dict | None = None) -> str:
    """Return the algorithm that "auto" uses for `nbytes` on `ranks` ranks, `per_node` per node.

    table: {bucket bytes: algorithm} measured on this communicator (comm/autotune.py): for host
    buffers its entry for bucket_bytes(nbytes) wins where it has one; the rule below decides
    the rest, and everything when no table was measured.

    Device buffers (`device`): NCCL where it can run (`nccl`), else MPI_Allreduce, which is
    CUDA-aware or stages once; never the hierarchical all-reduce, whose shared window is host
    memory (device -> host -> window -> device every step).
    Host buffers in a shared window (`window`: every rank's buffer from shared_array), several
    ranks on a node: the hierarchical all-reduce from HIERARCHICAL_MIN_BYTES (shared memory needs
    no messages), MPI_Allreduce below.
    Ordinary host arrays, several ranks on each of `nodes` > 1 nodes: the hierarchical all-reduce
    (with its copy in and out) from MPIFED_HIERARCHICAL_COPY_MIN_BYTES when set (off by default);
    otherwise, as with one rank per node: by size, MPI_Allreduce below the ring's threshold, the
    ring above.
    """
    if device:
        return "nccl" if nccl and ranks > 1 else "mpi"
    measured = table.get(bucket_bytes(nbytes)) if table else None
    if measured is not None:
        return measured
    nodes = nodes if nodes is not None else max(1, ranks // max(per_node, 1))
    if per_node > 1 and window:
        least = _threshold("MPIFED_HIERARCHICAL_MIN_BYTES", HIERARCHICAL_MIN_BYTES)
        return "hierarchical" if nbytes >= least else "mpi"
    if per_node > 1 and nodes > 1 and nbytes >= _threshold(
            "MPIFED_HIERARCHICAL_COPY_MIN_BYTES", HIERARCHICAL_COPY_MIN_BYTES):
        return "hierarchical"
    least = _threshold("MPIFED_RING_MIN_BYTES", RING_MIN_BYTES)
    if ranks > 1 and nbytes >= least * (ranks - 1):
        return "ring"
    return "mpi"


@functools.cache
def _smallest_threshold() -> int:
    """Return the size below which every host-buffer choice is MPI_Allreduce (bytes)."""
    return min(_threshold("MPIFED_RING_MIN_BYTES", RING_MIN_BYTES),
               _threshold("MPIFED_HIERARCHICAL_MIN_BYTES", HIERARCHICAL_MIN_BYTES),
               _threshold("MPIFED_HIERARCHICAL_COPY_MIN_BYTES", HIERARCHICAL_COPY_MIN_BYTES))


def _auto(buf, comm, check: bool, table: dict | None = None) -> tuple[str, bool]:
    """Return "auto"'s choice for `buf` on `comm` and whether the buffer still needs its check.

    table: the measured table installed on `comm`, if any; where it has the buffer's bucket,
    the chosen algorithm does its own check. Collective the first time per communicator.
    Otherwise, for host buffers the choice depends on whether every rank's buffer lies in a
    shared window: with `check`, that is agreed in the one tiny all-reduce that also checks
    length and dtype (so the chosen algorithm skips its own check); without it, each rank
    trusts its own buffer, as a training step does once checked.
    """
    if comm.size == 1:
        return "mpi", check  # nothing moves
    if is_device_array(buf):
        from .nccl import nccl_unavailable

        return choose_algorithm(buf.nbytes, comm.size, device=True,
                                nccl=nccl_unavailable(comm) is None), check
    if table and bucket_bytes(buf.nbytes) in table:
        return choose_algorithm(buf.nbytes, comm.size, table=table), check
    if buf.nbytes < _smallest_threshold():
        return "mpi", check  # below every crossover: MPI_Allreduce whatever the topology
    node, _ = topology(comm)
    nodes = comm.size // node.size
    plain = choose_algorithm(buf.nbytes, comm.size, node.size, window=False, nodes=nodes)
    if node.size == 1 or plain == choose_algorithm(buf.nbytes, comm.size, node.size, nodes=nodes):
        return plain, check  # windows make no difference here (small sizes): do not ask
    window, offset = window_of(buf)
    in_window, mixed = window is not None, False
    if check:
        in_window, mixed = _agree(comm, node, buf, window.ident if in_window else 0,
                                   offset)
    algorithm = choose_algorithm(buf.nbytes, comm.size, node.size, window=in_window, nodes=nodes)
    # where some ranks' buffers are in a window and others' not, hierarchical must agree itself
    return algorithm, mixed and algorithm == "hierarchical"


def _agree(comm, node, buf, ident: int, offset: int) -> tuple[bool, bool]:
    """Check length and dtype on all ranks; return (all buffers sit alike in one window per
    node, some do and some do not). A window is a node's: its number (`ident`) is compared
    inside the node (`node`, one tiny all-reduce), only the verdicts across nodes."""
    mine = np.array([ident, -ident, offset, -offset], dtype=np.int64)
    node.Allreduce(MPI.IN_PLACE, mine, op=MPI.MAX)
    here = int(ident != 0 and mine[0] == -mine[1] and mine[2] == -mine[3])
    code = SUPPORTED_DTYPES.index(buf.dtype.name)
    local = np.array([buf.size, -buf.size, code, -code, here, -here, int(ident != 0)],
                     dtype=np.int64)
    agreed = np.empty_like(local)
    comm.Allreduce(local, agreed, op=MPI.MAX)
    error = signature_error(agreed[:4])
    if error:
        raise ValueError(error)
    alike = bool(agreed[4] == 1 and agreed[5] == -1)  # every node's ranks in one window
    return alike, not alike and bool(agreed[6])


def allreduce(buf, comm, op: str = "sum", algorithm: str = "auto", *, check: bool = True):
    """Sum (or average) a contiguous 1-D NumPy/CuPy array over `comm` in place; return `buf`.

    algorithm: "ring" (our pipelined ring), "mpi" (MPI_Allreduce), "hierarchical" (shared memory
    inside a node, rings across nodes), "nccl" (CuPy buffers, GPU to GPU) or "auto" (device
    buffers: nccl where it can run, else mpi; host buffers: by topology, message size and
    whether the buffers lie in shared windows from shared_array; where a table measured on
    `comm` is installed (comm/autotune.py), host buffers follow it).
    check: agree on length and dtype first (one tiny all-reduce); pass False on a hot path whose
    buffer was checked once already.
    """
    if algorithm == "auto":
        table, chosen = installed(comm), None
        if type(buf) is np.ndarray and comm.size > 1:  # host buffers: the hot path, no choice
            if table is not None:
                chosen = table.algorithm(buf.nbytes)  # measured: each size resolved once
            elif buf.nbytes < _smallest_threshold():
                chosen = "mpi"  # below every crossover
        if chosen is None:
            check_local(buf, op)
            algorithm, check = _auto(buf, comm, check, table)
        else:
            algorithm = chosen  # the algorithm checks the buffer itself
    if algorithm == "hierarchical":
        return hierarchical_allreduce(buf, comm, op, check=check)
    if algorithm == "nccl":
        from .nccl import nccl_allreduce

        return nccl_allreduce(buf, comm, op, check=check)
    if algorithm == "ring":
        return ring_allreduce(buf, comm, op, check=check)
    if algorithm == "mpi":
        return mpi_allreduce(buf, comm, op, check=check)
    raise ValueError(f"algorithm={algorithm!r} is not known; use one of {ALGORITHMS}")


def algorithm_for(buf, comm, algorithm: str = "auto") -> str:
    """Return the algorithm `allreduce(buf, comm, algorithm=algorithm, check=False)` runs
    (collective the first time per communicator, like that call)."""
    if algorithm != "auto":
        return algorithm
    return _auto(buf, comm, False, installed(comm))[0]


SHARD_ALGORITHMS = ("auto", "ring", "mpi", "hierarchical")


def _resolve(algorithm: str, buf, comm, what: str) -> str:
    """Return the algorithm "auto" stands for (by the bytes moved), or raise for unknown names.

    The halves move half an all-reduce's bytes but cross the same thresholds: each has the
    same per-message latency and per-byte cost as the all-reduce it is half of.
    """
    if algorithm == "auto":
        chosen, _ = _auto(buf, comm, False)  # each rank asks of its own buffer, as in a step
        return "mpi" if chosen == "nccl" else chosen  # no NCCL halves: MPI's own, CUDA-aware
    if algorithm not in SHARD_ALGORITHMS:
        raise ValueError(f"{what}: algorithm={algorithm!r} is not known; use one of "
                         f"{SHARD_ALGORITHMS}")
    return algorithm


def reduce_scatter(buf, comm, op: str = "sum", algorithm: str = "auto", *, check: bool = True,
                   bounds=None):
    """Reduce a contiguous 1-D array over `comm` in place; return this rank's chunk, a view.

    buf: the same length and dtype on every rank of `comm` (float16/32/64, int32/64; NumPy or
    CuPy). Afterwards buf[lo:hi], with (lo, hi) = chunk_bounds(buf.size, comm.size)[comm.rank],
    holds the sum (op="sum") or mean (op="mean") over all ranks; the rest of `buf` is
    unspecified. algorithm: "ring", "hierarchical", "mpi" (MPI_Reduce_scatter) or "auto".
    A length or dtype mismatch raises the same ValueError on every rank (unless check=False).
    bounds: other (start, stop) chunks, one per rank in rank order, covering `buf` and the same
    on every rank (a layer's part of the model's chunks, as the sharded step uses).

    >>> reduce_scatter(np.ones(5), MPI.COMM_WORLD)   # on 2 ranks: rank 0 [2. 2. 2.], rank 1 [2. 2.]
    """
    algorithm = _resolve(algorithm, buf, comm, "reduce_scatter")
    if algorithm == "hierarchical":
        return hierarchical_reduce_scatter(buf, comm, op, check=check, bounds=bounds)
    if algorithm == "ring":
        return ring_reduce_scatter(buf, comm, op, check=check, bounds=bounds)
    return mpi_reduce_scatter(buf, comm, op, check=check, bounds=bounds)


def allgather(buf, comm, algorithm: str = "auto", *, check: bool = True, bounds=None):
    """Fill every chunk of a contiguous 1-D array from the rank of `comm` that owns it; return it.

    Rank r contributes buf[chunk_bounds(buf.size, comm.size)[r]]; afterwards every rank holds
    the same bytes in all of `buf`. The inverse half of `reduce_scatter`; same arguments.

    >>> allgather(np.full(5, float(MPI.COMM_WORLD.rank)), MPI.COMM_WORLD)  # 2 ranks: [0 0 0 1 1]
    """
    algorithm = _resolve(algorithm, buf, comm, "allgather")
    if algorithm == "hierarchical":
        return hierarchical_allgather(buf, comm, check=check, bounds=bounds)
    if algorithm == "ring":
        return ring_allgather(buf, comm, check=check, bounds=bounds)
    return mpi_allgather(buf, comm, check=check, bounds=bounds)
