"""The ring all-reduce: reduce-scatter then all-gather over point-to-point messages.

The buffer is cut into `size` chunks (the remainder spread over the first ones). In 2(size-1)
steps each rank sends one chunk to `dest` (right) and receives one from `source` (left): the
first size-1 steps add what arrives, the last size-1 copy it. Each chunk's sum is computed once,
by one rank, and copied to the others, so every rank ends with bitwise identical bytes.

In the reduce-scatter, chunks travel as segments received into a small rotating pool of scratch
buffers: while segment i is added, segments i+1.. are already on their way, and the pool stays in
cache, so the bytes received are added from cache instead of from memory. This is what makes the
ring beat MPI_Allreduce on one node, where both are bound by memory bandwidth.

16-bit floats travel as their raw uint16 words (datatypes.wire) and are added here, so the ring
needs no half-precision MPI datatype and gives the same bits under MPICH and Open MPI.
"""

from __future__ import annotations

from mpi4py import MPI

from ..xp import get_array_module, is_device_array
from .backend import mpi_view
from .checks import check_buffer
from .datatypes import wire

SEGMENT_BYTES = 1 << 20  # big enough to amortise a message's cost, small enough to stay in L2/L3
POOL_DEPTH = 2  # receives in flight per reduce-scatter step (tuned with bench/allreduce.py)

# (array module, dtype) -> reusable receive pool, grown as needed; cached on the communicator.
_SCRATCH = MPI.Comm.Create_keyval()


def chunk_bounds(length: int, parts: int) -> list[tuple[int, int]]:
    """Return `parts` (start, stop) pairs covering range(length), the remainder on the first ones."""
    base, extra = divmod(length, parts)
    bounds, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def mean_in_place(part, comm, op: str):
    """Divide `part` (this rank's reduced sum) by comm.size in place when op is "mean"; return it."""
    if op == "mean" and comm.size > 1:
        xp = get_array_module(part)
        xp.divide(part, part.dtype.type(comm.size), out=part)
    return part


def segment_bounds(start: int, stop: int, seg: int) -> list[tuple[int, int]]:
    """Return the (start, stop) segments of at most `seg` elements that cover [start, stop)."""
    return [(a, min(a + seg, stop)) for a in range(start, stop, seg)] or [(start, start)]


def ring_allreduce(buf, comm, op: str = "sum", *, check: bool = True,
                   segment_bytes: int = SEGMENT_BYTES):
    """Sum (or average) a contiguous 1-D array over all ranks of `comm` in place; return `buf`.

    buf: 1-D contiguous NumPy or CuPy array of float16/32/64 or int32/64, same length and dtype on
    every rank (checked collectively unless `check=False`; a mismatch raises ValueError everywhere).
    op: "sum" or "mean" (mean needs a float dtype).
    segment_bytes: size of the pipelined pieces of the reduce-scatter.

    Literally `ring_reduce_scatter` then `ring_allgather`: the two halves share this code.

    >>> ring_allreduce(np.ones(5), MPI.COMM_WORLD)   # on 3 ranks
    array([3., 3., 3., 3., 3.])
    """
    check_buffer(buf, comm, op, check)
    if comm.size > 1 and buf.size > 0:
        work, copy_back = mpi_view(buf, comm)
        chunks = ring_order(chunk_bounds(work.size, comm.size))
        reduce_scatter_steps(work, comm, chunks, segment_bytes)
        allgather_steps(work, comm, chunks)
        copy_back()
    return mean_in_place(buf, comm, op)


def ring_reduce_scatter(buf, comm, op: str = "sum", *, check: bool = True,
                        segment_bytes: int = SEGMENT_BYTES, bounds=None):
    """Reduce `buf` over `comm` so that this rank's chunk holds the sum (or mean); return it.

    The chunk is `buf[lo:hi]` with (lo, hi) = chunk_bounds(buf.size, comm.size)[comm.rank], a
    view of `buf`; the rest of `buf` holds partial sums afterwards. Same contract as
    ring_allreduce otherwise. bounds: other (start, stop) per rank, in rank order and covering
    `buf` (the same on every rank), instead of chunk_bounds.
    """
    check_buffer(buf, comm, op, check)
    bounds = bounds or chunk_bounds(buf.size, comm.size)
    lo, hi = bounds[comm.rank]
    if comm.size > 1 and buf.size > 0:
        work, copy_back = mpi_view(buf, comm)
        reduce_scatter_steps(work, comm, ring_order(bounds), segment_bytes)
        copy_back()
    own = buf[lo:hi]
    return mean_in_place(own, comm, op)


def ring_allgather(buf, comm, *, check: bool = True, bounds=None):
    """Fill every chunk of `buf` (chunk_bounds(buf.size, comm.size)) from its owner; return `buf`.

    Rank r contributes buf[chunk r]; afterwards every rank holds the same bytes everywhere.
    bounds: other chunks per rank, as in ring_reduce_scatter.
    """
    check_buffer(buf, comm, "sum", check)
    if comm.size > 1 and buf.size > 0:
        work, copy_back = mpi_view(buf, comm)
        allgather_steps(work, comm, ring_order(bounds or chunk_bounds(work.size, comm.size)))
        copy_back()
    return buf


def ring_bytes_sent(length: int, itemsize: int, size: int, rank: int) -> int:
    """Return the bytes rank `rank` sends in ring_allreduce of `length` items on `size` ranks.

    The reduce steps send every ring chunk but rank+1's, the copy steps every one but
    rank+2's: the buffer twice less two chunks, 2(size-1)/size of it when the chunks are equal.
    """
    if size < 2:
        return 0
    base, extra = divmod(length, size)  # chunk r holds base + (r < extra): chunk_bounds's cut
    kept = sum(base + (r < extra) for r in (rank, (rank + 1) % size))
    return (2 * length - kept) * itemsize


def ring_order(bounds: list) -> list:
    """Return `bounds` rotated so that the ring leaves chunk r reduced on rank r.

    After size-1 reduce steps rank r holds ring chunk r+1 complete; ring chunk j is therefore
    placed at bounds[j - 1].
    """
    return bounds[-1:] + bounds[:-1]


def reduce_scatter_steps(work, comm, chunks: list, segment_bytes: int = SEGMENT_BYTES) -> None:
    """Run the ring's size-1 reduce steps on `work`: rank r ends with ring chunk r+1 summed.

    chunks: ring-ordered (start, stop) pairs, any sizes (the same list on every rank).
    """
    seg = max(1, segment_bytes // work.itemsize)
    for step in range(comm.size - 1):
        _reduce_step(work, comm, chunks, step, seg)


def allgather_steps(work, comm, chunks: list) -> None:
    """Run the ring's size-1 copy steps: rank r sends ring chunk r+1 on; all end complete."""
    for step in range(comm.size - 1):
        _gather_step(work, comm, chunks, step)


def _scratch_pool(comm, xp, dtype, elements: int) -> list:
    """Return POOL_DEPTH reusable receive buffers of at least `elements` (kept warm).

    One pool per array module and dtype, grown only when a larger piece comes: reductions of
    several sizes in turn (the per-layer buckets of comm.overlap) reuse it instead of
    reallocating every step. Callers slice what they need.
    """
    pools = comm.Get_attr(_SCRATCH)
    if pools is None:
        pools = {}
        comm.Set_attr(_SCRATCH, pools)
    key = (xp.__name__, dtype.str)
    pool = pools.get(key)
    if pool is None or pool[0].size < elements:
        pool = pools[key] = [xp.empty(elements, dtype=dtype) for _ in range(POOL_DEPTH)]
    return pool


def _reduce_step(buf, comm, chunks, step: int, seg: int) -> None:
    """Send chunk rank-step to the right; receive chunk rank-step-1 from the left, adding it in."""
    xp = get_array_module(buf)
    size, rank = comm.size, comm.rank
    dest, source = (rank + 1) % size, (rank - 1) % size
    send_lo, send_hi = chunks[(rank - step) % size]
    recv_lo, recv_hi = chunks[(rank - step - 1) % size]
    pieces = segment_bounds(recv_lo, recv_hi, seg)
    pool = _scratch_pool(comm, xp, buf.dtype, min(seg, max(b - a for a, b in chunks)))
    sends = [comm.Isend(wire(buf[a:b]), dest, tag=step)
             for a, b in segment_bounds(send_lo, send_hi, seg)]
    recvs = {}

    def post(i):
        a, b = pieces[i]
        recvs[i] = comm.Irecv(wire(pool[i % POOL_DEPTH][:b - a]), source, tag=step)

    for i in range(min(POOL_DEPTH, len(pieces))):
        post(i)
    for i, (a, b) in enumerate(pieces):
        recvs.pop(i).Wait()
        piece = buf[a:b]
        xp.add(piece, pool[i % POOL_DEPTH][:b - a], out=piece)
        if is_device_array(buf):  # the slot is received into again: the add must be done
            xp.cuda.get_current_stream().synchronize()
        if i + POOL_DEPTH < len(pieces):
            post(i + POOL_DEPTH)
    MPI.Request.Waitall(sends)


def _gather_step(buf, comm, chunks, step: int) -> None:
    """Send the reduced chunk rank+1-step to the right; receive chunk rank-step from the left."""
    size, rank = comm.size, comm.rank
    send_lo, send_hi = chunks[(rank + 1 - step) % size]
    recv_lo, recv_hi = chunks[(rank - step) % size]
    comm.Sendrecv(wire(buf[send_lo:send_hi]), (rank + 1) % size, size + step,
                  wire(buf[recv_lo:recv_hi]), (rank - 1) % size, size + step)
