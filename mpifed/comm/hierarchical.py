"""The topology-aware all-reduce: through shared memory inside a node, rings across nodes.

Inside a node every rank reduces its own slice of the buffer by reading that slice straight from
the other ranks' shared segments, and writes the result back into every rank's segment: each
input byte is read once and each output byte written once, the least any all-reduce can do.
Across nodes, the ranks with the same node rank run the ring on their slice (Horovod's
hierarchical scheme: every rank carries 1/L of the inter-node traffic, not the leader alone),
and the result is shared back through the window. Buffers from `shared_array` are reduced in
place; others are copied into a cached window and back.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from . import lifetime
from .backend import host_view
from .checks import check_buffer
from .ring import (
    allgather_steps,
    chunk_bounds,
    mean_in_place,
    reduce_scatter_steps,
    ring_allgather,
    ring_allreduce,
    ring_order,
    ring_reduce_scatter,
)
from .shared import SharedWindow, window_of
from .topology import topology

BLOCK_BYTES = 64 * 1024  # the running sum stays in L1/L2 while L segments stream past

# The scratch window is cached on the node communicator, so it goes when that does.
_SCRATCH = lifetime.keyval()
# Every rank's node rank, cached on the communicator (the cross groups of the reduce-scatter).
_NODE_RANKS = MPI.Comm.Create_keyval()  # a plain list: nothing to free


def hierarchical_allreduce(buf, comm, op: str = "sum", *, check: bool = True):
    """Sum (or average) a contiguous 1-D array over `comm` in place; return `buf`.

    Same contract as ring_allreduce. Falls back to the ring when the nodes hold different rank
    counts. Fastest on buffers allocated with shared_array(..., node).
    """
    check_buffer(buf, comm, op, check)
    node, cross = topology(comm)
    if cross is None or node.size == 1:  # one rank per node: the ring itself, with no copies
        return ring_allreduce(buf, comm, op, check=False)
    if comm.size > 1 and buf.size > 0:
        work, copy_back = host_view(buf, comm)  # shared memory is host memory, CUDA-aware MPI or not
        _reduce_on_node(work, node, cross, comm.size if op == "mean" else 1, agree=check)
        copy_back()
    return buf


def _reduce_on_node(buf, node, cross, divide_by: int, agree: bool) -> None:
    """Take the zero-copy path if every rank can, reduce this rank's slice, share it back."""
    window, segments, zero_copy = _node_segments(buf, node, agree, 0, buf.size)
    lo, hi = slice_bounds(buf.size, node.size, node.rank)
    if cross.size == 1:
        _sum_slice_into_all(segments, lo, hi, divide_by, window.scratch(buf.dtype, BLOCK_BYTES))
    else:
        _sum_slice_across_nodes(segments, lo, hi, cross, divide_by)
    window.fence()  # every slice is written everywhere
    if not zero_copy:
        buf[...] = segments[node.rank]


def _node_segments(buf, node, agree: bool, lo: int, hi: int):
    """Return (window, every node rank's segment as `buf`, zero_copy) with the inputs ready.

    Zero copy when every rank's `buf` lies at the same place of one shared window; otherwise
    buf[lo:hi] is copied into a cached scratch window. agree: decide the path collectively (one
    tiny all-reduce, which is also the barrier that says the inputs are ready); without it each
    rank trusts that all buffers sit alike, as a training step's gradient buffer does once
    checked.
    """
    window, offset = window_of(buf)
    if agree:
        ident = window.ident if window is not None else 0
        agreed = np.array([ident, -ident, offset, -offset], dtype=np.int64)
        node.Allreduce(MPI.IN_PLACE, agreed, op=MPI.MAX)
        zero_copy = ident != 0 and agreed[0] == -agreed[1] and agreed[2] == -agreed[3]
    else:
        zero_copy = window is not None
        if zero_copy:
            window.fence()  # the inputs are ready
    if not zero_copy:
        window, offset = _scratch_window(node, buf.nbytes), 0
        window.views(buf.dtype, buf.size)[node.rank][lo:hi] = buf[lo:hi]
        window.fence()
    elif agree:
        window.win.Sync()
    return window, window.views(buf.dtype, buf.size, offset), zero_copy


def _cross_chunks(comm, node, bounds: list) -> list[list[tuple[int, int]]]:
    """Return, per node rank k, the chunks of the ranks with node rank k in cross-rank order."""
    node_ranks = comm.Get_attr(_NODE_RANKS)
    if node_ranks is None:
        node_ranks = comm.allgather(node.rank)
        comm.Set_attr(_NODE_RANKS, node_ranks)
    groups = [[] for _ in range(node.size)]
    for world_rank, k in enumerate(node_ranks):  # cross ranks follow comm ranks
        groups[k].append(bounds[world_rank])
    return groups


def _packed(chunks: list) -> list[tuple[int, int]]:
    """Return where each of `chunks` lies when they are packed one after another."""
    out, start = [], 0
    for a, b in chunks:
        out.append((start, start + b - a))
        start += b - a
    return out


def hierarchical_reduce_scatter(buf, comm, op: str = "sum", *, check: bool = True,
                                bounds=None):
    """Reduce `buf` over `comm`; return this rank's chunk of chunk_bounds (a view of `buf`).

    Node rank k sums, from the node's shared segments, the chunks of the ranks with node rank k
    on every node, then reduce-scatters them over the ring of those ranks (`cross`). Same
    contract as ring_reduce_scatter; the rest of `buf` is unspecified afterwards.
    """
    check_buffer(buf, comm, op, check)
    node, cross = topology(comm)
    if cross is None:
        return ring_reduce_scatter(buf, comm, op, check=False, bounds=bounds)
    bounds = bounds or chunk_bounds(buf.size, comm.size)
    lo, hi = bounds[comm.rank]
    if comm.size > 1 and buf.size > 0:
        work, copy_back = host_view(buf, comm)
        window, segments, _ = _node_segments(work, node, check, 0, work.size)
        mine = _cross_chunks(comm, node, bounds)[node.rank]
        places = _packed(mine)
        packed = np.empty(places[-1][1], dtype=work.dtype)
        for (a, b), (pa, pb) in zip(mine, places):
            if b > a:
                _sum_block(segments, a, b, packed[pa:pb], 1)
        if packed.size:
            reduce_scatter_steps(packed, cross, ring_order(places))
        pa, pb = places[cross.rank]
        work[lo:hi] = packed[pa:pb]
        window.fence()  # no rank reads this rank's segment any more
        copy_back()
    own = buf[lo:hi]
    return mean_in_place(own, comm, op)


def hierarchical_allgather(buf, comm, *, check: bool = True, bounds=None):
    """Fill every chunk of `buf` from its owner (in place); return `buf`.

    Each rank leaves its chunk in its shared segment; node rank k gathers the chunks of the
    ranks with node rank k over `cross` into its segment, and every rank copies the node's
    segments out. Same contract as ring_allgather.
    """
    check_buffer(buf, comm, "sum", check)
    node, cross = topology(comm)
    if cross is None:
        return ring_allgather(buf, comm, check=False, bounds=bounds)
    if comm.size > 1 and buf.size > 0:
        bounds = bounds or chunk_bounds(buf.size, comm.size)
        lo, hi = bounds[comm.rank]
        work, copy_back = host_view(buf, comm)
        window, segments, zero_copy = _node_segments(work, node, check, lo, hi)
        groups = _cross_chunks(comm, node, bounds)
        if cross.size > 1:
            mine = groups[node.rank]
            places = _packed(mine)
            packed = np.empty(places[-1][1], dtype=work.dtype)
            pa, pb = places[cross.rank]
            packed[pa:pb] = work[lo:hi]
            if packed.size:
                allgather_steps(packed, cross, ring_order(places))
            own_segment = segments[node.rank]
            for (a, b), (pa, pb) in zip(mine, places):
                own_segment[a:b] = packed[pa:pb]
        window.fence()  # every node rank's group of chunks is in its segment
        for peer, segment in enumerate(segments):
            if peer != node.rank or not zero_copy:
                for a, b in groups[peer]:
                    work[a:b] = segment[a:b]
        window.fence()  # nobody reads a segment any more: each rank may write its own
        copy_back()
    return buf


def slice_bounds(length: int, parts: int, index: int) -> tuple[int, int]:
    """Return chunk `index` of chunk_bounds(length, parts), without building the list."""
    base, extra = divmod(length, parts)
    lo = index * base + min(index, extra)
    return lo, lo + base + (1 if index < extra else 0)


def _sum_slice_into_all(segments, lo: int, hi: int, divide_by: int, acc) -> None:
    """Write sum_j segments[j][lo:hi] (divided by `divide_by`) into every segment, blockwise.

    acc: a cache-sized scratch array holding the running sum of one block.
    """
    block = acc.size
    for a in range(lo, hi, block):
        b = min(hi, a + block)
        total = acc[:b - a]
        _sum_block(segments, a, b, total, divide_by)
        for seg in segments:
            seg[a:b] = total


def _sum_block(segments, a: int, b: int, out, divide_by: int) -> None:
    """out = sum over segments of seg[a:b], in rank order (the same order on every node)."""
    if len(segments) == 1:
        out[...] = segments[0][a:b]
    else:
        np.add(segments[0][a:b], segments[1][a:b], out=out)
        for seg in segments[2:]:
            out += seg[a:b]
    if divide_by > 1:
        np.divide(out, out.dtype.type(divide_by), out=out)


def _sum_slice_across_nodes(segments, lo: int, hi: int, cross, divide_by: int) -> None:
    """Sum the slice on this node, ring it across nodes, then write it into every segment."""
    piece = np.empty(hi - lo, dtype=segments[0].dtype)
    if hi > lo:
        _sum_block(segments, lo, hi, piece, 1)
    ring_allreduce(piece, cross, check=False)
    if divide_by > 1:
        np.divide(piece, piece.dtype.type(divide_by), out=piece)
    for seg in segments:
        seg[lo:hi] = piece


def _scratch_window(node, nbytes: int) -> SharedWindow:
    """Return this node's cached window of at least `nbytes` (grown collectively when needed)."""
    window = node.Get_attr(_SCRATCH)
    if window is None or window.nbytes < nbytes:
        if window is not None:
            window.free()
        window = SharedWindow.allocate(node, nbytes)
        lifetime.cache(node, _SCRATCH, window)
    return window
