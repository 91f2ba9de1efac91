"""PowerSGD (Vogels, Karimireddy and Jaggi 2019): rank-r gradient compression with error
feedback and warm start, after PyTorch's `ddp_comm_hooks/powerSGD_hook.py`.

Each parameter tensor of two or more axes is a matrix M (n x m): its output count by everything
else, a convolution's W (out, in, kh, kw) as (out, in*kh*kw). A block marked `transposed` (a
linear layer's W, stored (in, out)) is read as the transpose of its stored (shape[0], rest), so
that M is (out, in) there too, as in PyTorch. One step of power iteration replaces the mean over
ranks of M by P Q^T of rank r, so a rank sends (n + m) r numbers instead of n m:

    M += e                       # error feedback: what earlier steps left out
    P = M Q                      # (n, r); Q (m, r) is last step's (warm start), orthogonalised
    P = orth(sum over ranks P)   # Gram-Schmidt (epsilon against zero columns), QR above r = 2
    Q = (sum over ranks M^T P) / p
    e = M - P Q^T                # this rank's input minus the approximation all ranks share
    M = P Q^T

Vectors (biases, norms) and matrices where (n + m) r * min_rate >= n m gain too little and are
averaged exactly, all in one buffer. The first `start` steps are exact for every tensor
(PyTorch's start_powerSGD_iter): early training is the most sensitive to a biased gradient.

Where this differs from PyTorch, and why:
- the exactly averaged tensors travel in the buffer of the P's: two all-reduces a step, not
  three (under overlap every layer pays a collective's latency each time);
- error buffers only for compressed matrices: for an exactly averaged tensor PyTorch's error is
  the local gradient minus the mean, whose mean over ranks is zero, so it never changes a result;
- the first Q comes from NumPy's generator seeded with `seed`, on the host, so CPU and GPU runs
  start alike;
- a column of Q that is exactly zero (a step where the matrix was zero on every rank) is
  restarted from the first Q: with warm start PyTorch keeps it zero, and the matrix's
  approximation with it, for the rest of training.

This module is the math; the sum over ranks is the `allreduce_sum` the caller hands in (the
package's ring), and nothing here knows of MPI or of models.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from math import prod

import numpy as np

from ...xp import get_array_module, synchronize

EPSILON = 1e-8  # added to a column's norm: a zero column stays zero instead of becoming NaN


@dataclass(frozen=True)
class Matrix:
    """One compressed tensor: where it lives in the gradient, in the Q array and the error."""

    offset: int  # first element in the flat gradient buffer
    shape: tuple  # as stored
    rows: int  # n: the output count
    cols: int  # m: everything else
    rank: int  # r = min(n, m, the compressor's rank)
    transposed: bool  # M is the transpose of the stored (shape[0], rest)
    q_at: int  # first element of its Q (m * r) in the flat Q array
    error_at: int  # first element of its error (n * m) in the flat error array

    @property
    def size(self) -> int:
        return self.rows * self.cols

    @property
    def end(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Range:
    """What one call's range [lo, hi) holds: its matrices, the rest, where each P goes."""

    matrices: tuple  # the Matrix entries inside [lo, hi), by offset
    rest: tuple  # (start, stop) pieces of the range, relative to lo, sent uncompressed
    rest_size: int  # their total length: the head of the send buffer
    p_at: tuple  # first element of each matrix's P (n * r) in the send buffer
    length: int  # the send buffer's length: rest_size + every P


def worth_compressing(rows: int, cols: int, rank: int, min_rate: float) -> bool:
    """Tell whether (n + m) r numbers beat n m by more than `min_rate` (PyTorch's rule)."""
    return (rows + cols) * rank * min_rate < rows * cols


def ring_share(world_size: int) -> float:
    """Return the fraction of a buffer that a ring all-reduce sends from each rank: 2(p-1)/p."""
    return 2 * (world_size - 1) / world_size


def orthogonalize(a, epsilon: float = EPSILON) -> None:
    """Make the columns of `a` (n, r), n >= r, orthonormal in place, as PyTorch's _orthogonalize.

    Up to two columns, or in half precision: Gram-Schmidt, where epsilon keeps a zero column
    zero. Above: QR, since Gram-Schmidt loses orthogonality in float32 as the columns grow
    alike (at full rank 16, float32, the mean came out 2e-3 off with it, 8e-7 with QR).
    """
    if a.shape[1] <= 2 or a.dtype.itemsize < 4:
        gram_schmidt(a, epsilon)
    else:
        a[...] = get_array_module(a).linalg.qr(a)[0]  # (n, r); a zero column gives no NaN


def gram_schmidt(a, epsilon: float = EPSILON) -> None:
    """Orthonormalise the columns of `a` (n, r) in place, one after the other.

    Modified Gram-Schmidt, as PyTorch's _orthogonalize_gram_schmidt: a column is normalised,
    then removed from the columns after it. With epsilon > 0 a zero column stays zero.
    """
    xp = get_array_module(a)
    for i in range(a.shape[1]):
        col = a[:, i]  # (n,)
        col /= xp.linalg.norm(col) + epsilon
        if i + 1 < a.shape[1]:
            rest = a[:, i + 1:]  # (n, r - i - 1)
            rest -= col[:, None] * (col @ rest)  # (n, 1) * (r - i - 1,)


def plan_matrices(blocks, rank: int, min_rate: float) -> list[Matrix]:
    """Return the Matrix of every block worth compressing, by offset.

    blocks: (offset, shape) or (offset, shape, transposed) per parameter tensor of the flat
    gradient buffer; they must not overlap.
    """
    entries = sorted((int(b[0]), tuple(int(d) for d in b[1]), bool(b[2]) if len(b) > 2 else False)
                     for b in blocks)
    matrices, q_at, error_at, end = [], 0, 0, 0
    for offset, shape, transposed in entries:
        if offset < end:
            raise ValueError(f"powersgd: the block at offset {offset} (shape {shape}) overlaps "
                             f"the one before it, which ends at {end}; pass each parameter "
                             f"tensor once, with its offset in the flat gradient buffer")
        end = offset + prod(shape)
        if len(shape) < 2:
            continue
        rows, cols = (prod(shape[1:]), shape[0]) if transposed else (shape[0], prod(shape[1:]))
        r = min(rows, cols, rank)
        if worth_compressing(rows, cols, r, min_rate):
            matrices.append(Matrix(offset, shape, rows, cols, r, transposed, q_at, error_at))
            q_at += cols * r
            error_at += rows * cols
    return matrices


class PowerSGD:
    """Average gradients over ranks as rank-r approximations, with error feedback.

    blocks: (offset, shape) of every parameter tensor in the flat gradient buffer, or
    (offset, shape, True) for one whose output count is its last axis (a linear layer's W,
    stored (in, out)); a tensor of two or more axes is the matrix (output count, the rest).
    rank: r, the approximation's rank (per matrix min(n, m, r)).
    min_rate: a matrix is compressed only when n m > (n + m) r * min_rate; 0 compresses all.
    start: the number of first steps averaged exactly (steps count from 1).
    xp, dtype: the array module and float dtype of the gradients; the state lives there too.
    seed: seeds the first Q, which must be the same on every rank.

    Every rank builds one with the same arguments and calls reduce_mean on the same ranges in
    the same order. On one node of 3 ranks, a 64-512-256-10 MLP at rank 2:

    >>> psgd = PowerSGD(blocks, rank=2, start=10)
    >>> psgd.reduce_mean(grad, 0, lambda buf: ring_allreduce(buf, comm), comm.size, step)
    >>> psgd.uncompressed_bytes() / psgd.bytes_sent()   # after the warm-up, about 42
    """

    name = "powersgd"
    epsilon = EPSILON

    def __init__(self, blocks, rank: int = 2, min_rate: float = 2.0, start: int = 10, xp=np,
                 dtype=np.float32, seed: int = 0):
        if int(rank) != rank or rank < 1:
            raise ValueError(f"powersgd: rank must be a whole number >= 1, got {rank!r}")
        if min_rate < 0:
            raise ValueError(f"powersgd: min_rate must be >= 0, got {min_rate!r}")
        if int(start) != start or start < 0:
            raise ValueError(f"powersgd: start must be a whole number >= 0, got {start!r}")
        self.rank, self.min_rate, self.start = int(rank), float(min_rate), int(start)
        self.xp, self.dtype = xp, np.dtype(dtype)
        self.matrices = plan_matrices(blocks, self.rank, self.min_rate)
        self._starts = [m.offset for m in self.matrices]
        q_size = sum(m.cols * m.rank for m in self.matrices)
        first_q = np.random.default_rng(seed).standard_normal(q_size)  # float64, on the host
        self._q = xp.asarray(first_q.astype(self.dtype))  # every Q, by offset: the warm start
        self._first_q = self._q.copy()  # where a column that died restarts
        self._error = xp.zeros(sum(m.size for m in self.matrices), dtype=self.dtype)
        self._ranges = {}  # (lo, size) -> (Range, send buffer): planned and allocated once
        self._sent = 0.0  # bytes this rank sent, ring-equivalent
        self._plain = 0.0  # bytes a plain ring all-reduce of the same ranges would have sent

    def reduce_mean(self, grad, lo: int, allreduce_sum, world_size: int, step: int) -> None:
        """Replace `grad` in place by the (approximate) mean over ranks of everyone's `grad`.

        grad: 1-D, this rank's gradient for flat-buffer elements [lo, lo + grad.size): the whole
        model, or one layer's range under overlap (a compressed matrix may not be cut by it).
        allreduce_sum(buf): sums a contiguous 1-D buffer in place over the ranks.
        world_size: the number of ranks. step: counts from 1; steps <= start are exact.
        Every rank ends with the same values (given an allreduce_sum that leaves the same bytes
        everywhere, as the ring does).
        """
        xp = self.xp
        part, buf = self._range(grad, lo)
        self._plain += grad.nbytes * ring_share(world_size)
        if step <= self.start or not part.matrices:
            self._sum(grad, allreduce_sum, world_size)
            xp.divide(grad, self.dtype.type(world_size), out=grad)
            return
        stored = [self._stored(grad, lo, m) for m in part.matrices]  # (shape[0], rest) views
        errors = [self._error[m.error_at:m.error_at + m.size] for m in part.matrices]
        mats = [e.reshape(m.shape[0], -1) for m, e in zip(part.matrices, errors)]  # M's home
        qs = [self._q[m.q_at:m.q_at + m.cols * m.rank].reshape(m.cols, m.rank)
              for m in part.matrices]
        ps = [buf[at:at + m.rows * m.rank].reshape(m.rows, m.rank)
              for m, at in zip(part.matrices, part.p_at)]
        for m, s, e, mat, q, p in zip(part.matrices, stored, errors, mats, qs, ps):
            self._left_factor(m, s, e, mat, q, p)
        self._pack_rest(grad, part, buf)
        self._sum(buf, allreduce_sum, world_size)
        self._unpack_rest(grad, part, buf, world_size)
        for m, mat, q, p in zip(part.matrices, mats, qs, ps):
            orthogonalize(p, self.epsilon)
            xp.matmul(_oriented(mat, m).T, p, out=q)  # (m, r) = M^T P
        first, last = part.matrices[0], part.matrices[-1]
        q_all = self._q[first.q_at:last.q_at + last.cols * last.rank]  # this range's Qs
        self._sum(q_all, allreduce_sum, world_size)
        xp.divide(q_all, self.dtype.type(world_size), out=q_all)
        for m, s, e, q, p in zip(part.matrices, stored, errors, qs, ps):
            self._decompress(m, s, e, q, p)

    def _left_factor(self, m: Matrix, s, e, mat, q, p) -> None:
        """Add the gradient into the error buffer, which then holds M until the approximation
        is subtracted, and set P = M Q (Q orthonormal). mat: the error buffer in the stored
        layout; M is read from there, so the gradient block is only read here (one pass over
        it, not the two that adding into it and copying it out took: at 46 M parameters each
        pass is 185 MB of memory traffic)."""
        e += s.reshape(-1)  # (n * m,): gradient + what earlier steps left out (commutes bitwise)
        first = self._first_q[m.q_at:m.q_at + m.cols * m.rank].reshape(m.cols, m.rank)
        self.xp.copyto(q, first, where=~q.any(axis=0))  # (r,) zero columns restart; no sync
        orthogonalize(q, self.epsilon)
        self.xp.matmul(_oriented(mat, m), q, out=p)  # (n, r) = M Q

    def _decompress(self, m: Matrix, s, e, q, p) -> None:
        """Write P Q^T into the gradient block; leave M - P Q^T in the error buffer."""
        if m.transposed:
            self.xp.matmul(q, p.T, out=s)  # (m, n): the stored layout of P Q^T
        else:
            self.xp.matmul(p, q.T, out=s)  # (n, m)
        e -= s.reshape(-1)

    def _pack_rest(self, grad, part: Range, buf) -> None:
        """Copy the uncompressed pieces of `grad` into the head of the send buffer."""
        at = 0
        for a, b in part.rest:
            buf[at:at + b - a] = grad[a:b]
            at += b - a

    def _unpack_rest(self, grad, part: Range, buf, world_size: int) -> None:
        """Put the summed uncompressed pieces back into `grad`, divided by the world size."""
        at, p = 0, self.dtype.type(world_size)
        for a, b in part.rest:
            self.xp.divide(buf[at:at + b - a], p, out=grad[a:b])
            at += b - a

    def _sum(self, buf, allreduce_sum, world_size: int) -> None:
        """Sum `buf` over the ranks with the caller's all-reduce, counting what it sends."""
        synchronize(buf)  # the kernels that wrote it are done before any MPI call reads it
        allreduce_sum(buf)
        self._sent += buf.nbytes * ring_share(world_size)

    def _stored(self, grad, lo: int, m: Matrix):
        """Return the block of `m` in `grad` as its stored (shape[0], rest) view."""
        a = m.offset - lo
        return grad[a:a + m.size].reshape(m.shape[0], -1)

    def _range(self, grad, lo: int):
        """Check a call's arguments; return the Range of [lo, lo + grad.size) and its buffer."""
        if grad.ndim != 1 or grad.dtype != self.dtype:
            raise ValueError(f"powersgd: the gradient must be 1-D {self.dtype}, got "
                             f"{grad.ndim}-D {grad.dtype}; build PowerSGD with the gradient's "
                             f"dtype")
        key = (int(lo), int(grad.size))
        if key not in self._ranges:
            part = self._plan_range(*key)
            self._ranges[key] = part, self.xp.empty(part.length, dtype=self.dtype)
        return self._ranges[key]

    def _plan_range(self, lo: int, size: int) -> Range:
        """Return which matrices [lo, lo + size) holds and which pieces go uncompressed."""
        hi = lo + size
        i, j = bisect_left(self._starts, lo), bisect_left(self._starts, hi)
        for cut in ([self.matrices[i - 1]] if i > 0 else []) + self.matrices[i:j][-1:]:
            if cut.offset < lo < cut.end or cut.offset < hi < cut.end:
                raise ValueError(f"powersgd: the range [{lo}, {hi}) cuts the matrix at offset "
                                 f"{cut.offset} (shape {cut.shape}); reduce whole parameter "
                                 f"tensors (one layer's range, or the whole model)")
        matrices, rest, cursor = tuple(self.matrices[i:j]), [], lo
        for m in matrices:
            if m.offset > cursor:
                rest.append((cursor - lo, m.offset - lo))
            cursor = m.end
        if cursor < hi:
            rest.append((cursor - lo, hi - lo))
        rest_size = sum(b - a for a, b in rest)
        p_at, at = [], rest_size
        for m in matrices:
            p_at.append(at)
            at += m.rows * m.rank
        return Range(matrices, tuple(rest), rest_size, tuple(p_at), at)

    def factors(self, offset: int):
        """Return the last step's P (n, r), orthonormal, and Q (m, r) of the matrix at `offset`.

        For inspection, as PyTorch's p_memory_dict and q_memory_dict; P is a view of a buffer
        that the next call on the same range overwrites.
        """
        at = bisect_left(self._starts, offset)
        if at == len(self.matrices) or self._starts[at] != offset:
            raise KeyError(f"powersgd: no compressed matrix at offset {offset}")
        m = self.matrices[at]
        for part, buf in self._ranges.values():
            if m in part.matrices:
                p_at = part.p_at[part.matrices.index(m)]
                p = buf[p_at:p_at + m.rows * m.rank].reshape(m.rows, m.rank)
                return p, self._q[m.q_at:m.q_at + m.cols * m.rank].reshape(m.cols, m.rank)
        raise KeyError(f"powersgd: the matrix at offset {offset} has not been compressed yet")

    def bytes_sent(self) -> int:
        """Return the bytes this rank has sent so far: buffers summed, times 2(p-1)/p."""
        return round(self._sent)

    def uncompressed_bytes(self) -> int:
        """Return the bytes a plain ring all-reduce of the same ranges would have sent."""
        return round(self._plain)

    def state(self) -> dict:
        """Return copies of the error buffers and Qs (flat, by offset) for a checkpoint."""
        return {"q": self._q.copy(), "error": self._error.copy()}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned; the model and rank must be the ones it came from."""
        for key, mine in (("q", self._q), ("error", self._error)):
            if key not in state:
                raise ValueError(f"powersgd: the checkpoint has no {key!r} (found: "
                                 f"{', '.join(sorted(state)) or 'nothing'}); was it saved with "
                                 f"comm.compression = \"powersgd\"?")
            saved = self.xp.asarray(state[key], dtype=self.dtype).reshape(-1)
            if saved.size != mine.size:
                raise ValueError(f"powersgd: the checkpoint's {key!r} has {saved.size} elements, "
                                 f"this model at rank {self.rank} needs {mine.size}; resume with "
                                 f"the model and comm.powersgd_rank it was saved with")
            mine[...] = saved


def _oriented(stored, m: Matrix):
    """Return M (n, m) as a view of the stored block."""
    return stored.T if m.transposed else stored
