"""Compressed gradient exchange under mpiexec: the half-precision ring against MPI_Allreduce
of the fp32 values, its bytes counted by hand, the loss and stop slots exact, and the step with
comm.compression = "none" bit for bit the step as it was before compressors."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm import allreduce
from mpifed.comm.compression import COMPRESSORS, make_compressor, model_blocks
from mpifed.comm.compression.codecs import decode, encode
from mpifed.comm.half_ring import half_ring_allreduce_mean
from mpifed.comm.ring import chunk_bounds, ring_bytes_sent
from mpifed.nn.models import ModelSpec, init_params
from mpifed.optim import make_optimizer
from mpifed.train.config import resolve
from mpifed.train.step import DataParallelStep
from mpifed.xp import mark

pytestmark = pytest.mark.mpi(min_size=1)

UNIT_ROUNDOFF = {"fp16": 2.0 ** -11, "bf16": 2.0 ** -8}


@pytest.fixture(params=["self", "world"])
def comm(request):
    return MPI.COMM_SELF if request.param == "self" else MPI.COMM_WORLD


def rank_values(comm, n: int, dtype=np.float32, scale=1.0, seed=0):
    """This rank's values (different on each rank) and all ranks', in rank order."""
    rng = np.random.default_rng(seed)
    every = (rng.standard_normal((comm.size, n)) * scale).astype(dtype)
    return every[comm.rank].copy(), every


def reference_mean(values, comm):
    """MPI_Allreduce of the fp32 values in float64, over the rank count: no rounding to speak of."""
    total = np.empty(values.size, np.float64)
    comm.Allreduce(values.astype(np.float64), total, op=MPI.SUM)
    return total / comm.size


def hand_bytes(m: int, tail: int, itemsize: int, size: int, rank: int) -> int:
    """Wire bytes of the half ring by hand: 2-byte items, the tail's values as itemsize/2
    items each in the last chunk; each rank sends the wire twice less its own chunk and the
    next rank's."""
    if size < 2:
        return 0
    chunks = [b - a for a, b in chunk_bounds(m, size)]
    chunks[-1] += tail * itemsize // 2
    return 2 * (2 * sum(chunks) - chunks[rank] - chunks[(rank + 1) % size])


def same_on_every_rank(comm, values) -> bool:
    return all(np.array_equal(v, values) for v in comm.allgather(values))


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("predivide", [True, False])
@pytest.mark.parametrize("n", [1, 7, 1000, 4099])
def test_half_ring_is_the_mean_within_one_rounding_per_hop(comm, wire, predivide, n):
    values, every = rank_values(comm, n, seed=n)
    want = reference_mean(values, comm)
    sent = half_ring_allreduce_mean(values, comm, wire, predivide=predivide)
    assert same_on_every_rank(comm, values)
    p, u = comm.size, UNIT_ROUNDOFF[wire]
    # p - 1 partial sums rounded on the reduce steps, one more for the copy steps; none of
    # them larger than the sum of magnitudes (over p when divided first): relative to the
    # mean, at most (p + 1) u of sum |x| / p, plus fp32's own additions
    bound = (p + 1) * u * np.abs(every).sum(0) / p + 1e-6 * np.abs(want) + 1e-30
    assert np.all(np.abs(values - want) <= bound)
    if p > 1:  # each result came off the wire (divided before, either way): a half value
        back = np.empty(n, np.uint16)
        encode(values, back, wire)
        np.testing.assert_array_equal(decode(back, wire, np.float32), values)
    assert sent == hand_bytes(n, 0, 4, p, comm.rank)


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
def test_the_wire_carries_exactly_half_the_bytes_of_the_fp32_ring(comm, wire):
    n = 3 * 1024 + 1
    values, _ = rank_values(comm, n)
    sent = half_ring_allreduce_mean(values, comm, wire)
    assert 2 * sent == ring_bytes_sent(n, 4, comm.size, comm.rank)
    assert comm.allreduce(sent) == 2 * (comm.size - 1) * n * 2  # 2(p-1)/p of n halves each


@pytest.mark.mpi(min_size=3)
def test_predivide_keeps_fp16_sums_in_range():
    """Undivided, the second reduce hop carries 80000, past fp16's largest (65504); the mean
    itself fits. (On 2 ranks only single values travel before the owner divides.)"""
    comm = MPI.COMM_WORLD
    big = np.full(64, 40000.0, np.float32)
    divided = big.copy()
    half_ring_allreduce_mean(divided, comm, "fp16", predivide=True)
    np.testing.assert_array_equal(divided, np.float32(np.float16(40000.0)))
    after = big.copy()
    with np.errstate(over="ignore"):
        half_ring_allreduce_mean(after, comm, "fp16", predivide=False)
    assert np.isinf(after).any()
    both = big.copy()
    half_ring_allreduce_mean(both, comm, "bf16", predivide=False)  # bf16 has fp32's range
    assert np.isfinite(both).all()


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("predivide", [True, False])
def test_the_exact_tail_comes_back_as_its_exact_mean(comm, wire, dtype, predivide):
    n = 10
    values, _ = rank_values(comm, n + 2, dtype)
    values[n] = dtype(0.1) * (comm.rank + 1)  # a loss: not a half-precision value
    values[n + 1] = 1.0 if comm.rank == comm.size - 1 else 0.0  # one rank asked to stop
    losses = np.array([dtype(0.1) * (r + 1) for r in range(comm.size)], dtype)
    sent = half_ring_allreduce_mean(values, comm, wire, predivide=predivide, exact_tail=2)
    assert same_on_every_rank(comm, values)
    # each chunk is summed in ring order; these few losses add exactly in any order
    want = losses.sum(dtype=dtype) / dtype(comm.size) if comm.size > 1 else losses[0]
    assert values[n] == pytest.approx(want, rel=4 * float(np.finfo(dtype).eps))
    assert values[n + 1] == dtype(1.0) / dtype(comm.size)
    assert sent == hand_bytes(n, 2, np.dtype(dtype).itemsize, comm.size, comm.rank)


def test_the_exact_tail_is_bitwise_the_sum_over_the_ring():
    """Values whose every partial sum is exact: the tail equals the reference to the bit."""
    comm = MPI.COMM_WORLD
    values = np.array([0.5, 0.25, 0.125 * (comm.rank + 1), float(comm.rank == 0)], np.float32)
    half_ring_allreduce_mean(values, comm, "fp16", exact_tail=2)
    p = comm.size
    assert values[2] == np.float32(0.125 * p * (p + 1) / 2) / np.float32(p)
    assert values[3] == np.float32(1.0) / np.float32(p)


# --- the step -------------------------------------------------------------------------------

FEATURES, HIDDEN, CLASSES, BATCH, SEED = 6, 5, 3, 4, 11


class StepBeforeCompressors(DataParallelStep):
    """The step's exchange as it was: one mean all-reduce of the range."""

    def _reduce(self, lo, hi, after=None):
        start = mark(self.xp)
        allreduce(self.grad[lo:hi], self.comm, "mean", self.algorithm, check=False)
        return start, mark(self.xp)


def batches(comm, steps: int, seed=5):
    rng = np.random.default_rng(seed)
    rows = steps * comm.size * BATCH
    y = rng.integers(0, CLASSES, size=rows)
    x = rng.standard_normal((rows, FEATURES)) + y[:, None]
    for t in range(steps):
        mine = slice((t * comm.size + comm.rank) * BATCH, (t * comm.size + comm.rank + 1) * BATCH)
        yield x[mine], y[mine]


def train(cls, comm, algorithm, overlap, steps=4, dtype="float64", compressor=None,
          stop_at=None):
    spec = ModelSpec("mlp", FEATURES, (HIDDEN,), CLASSES)
    params = init_params(spec, SEED, dtype=dtype)
    opt = make_optimizer(resolve({"data": {"train": "d.h5"},
                                  "optim": {"name": "sgd", "momentum": 0.9}}).optim)
    step = cls(spec, params, comm, algorithm, np, overlap, stall_timeout=0,
               compressor=compressor and compressor(spec, params.dtype))
    losses, stops = [], []
    try:
        for t, (x, y) in enumerate(batches(comm, steps)):
            stop = 1.0 if stop_at == (t, comm.rank) else 0.0
            losses.append(step(x.astype(dtype), y, opt, 0.1, t + 1, stop=stop))
            stops.append(step.stop_agreed)
    finally:
        step.close()
    step.free()
    return params, losses, stops, step


@pytest.mark.parametrize("algorithm,overlap", [("ring", False), ("mpi", False),
                                               ("auto", False), ("hierarchical", False),
                                               ("ring", True), ("auto", True)])
def test_none_is_bit_for_bit_the_step_before_compressors(comm, algorithm, overlap):
    want, want_losses, _, _ = train(StepBeforeCompressors, comm, algorithm, overlap)
    got, losses, _, step = train(DataParallelStep, comm, algorithm, overlap)
    assert got.tobytes() == want.tobytes() and losses == want_losses
    assert step.compressor.name == "none"
    n = got.size
    sizes = [n + 2] if not overlap or comm.size == 1 else [hi - lo for lo, hi in (
        step.spec.layer_range(i, got.dtype) for i in range(len(step.spec.layers)))]
    if overlap and comm.size > 1:
        sizes[-1] += 2  # the last layer carries the slots
    per_step = sum(ring_bytes_sent(s, 8, comm.size, comm.rank) for s in sizes)
    assert step.exchange_bytes() == (4 * per_step, 4 * per_step)


def half(wire, predivide=True):
    def build(spec, dtype):
        settings = resolve({"data": {"train": "d.h5"},
                            "comm": {"compression": wire, "predivide": predivide}}).comm
        return make_compressor(settings, model_blocks(spec, dtype), np, dtype)
    return build


@pytest.mark.parametrize("wire", ["fp16", "bf16"])
@pytest.mark.parametrize("overlap", [False, True])
def test_half_precision_steps_track_the_exact_ones(comm, wire, overlap):
    stop_at = (2, comm.size - 1)  # the last rank asks to stop at the third step
    want, want_losses, want_stops, _ = train(DataParallelStep, comm, "ring", overlap,
                                             dtype="float32", stop_at=stop_at)
    got, losses, stops, step = train(DataParallelStep, comm, "ring", overlap, dtype="float32",
                                     compressor=half(wire), stop_at=stop_at)
    assert same_on_every_rank(comm, got)
    assert stops == want_stops == [False, False, True, False]
    assert losses[0] == pytest.approx(want_losses[0], rel=1e-6)  # the same model: exact slots
    tol = 20 * UNIT_ROUNDOFF[wire]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    sent, plain = (sum(v) for v in zip(*comm.allgather(step.exchange_bytes())))
    # the loss and stop slots travel at full width (on the last chunk's ranks, so per rank
    # the ratio varies): over all ranks a small model stays just below 2x
    assert (sent == plain == 0) if comm.size == 1 else 1.5 < plain / sent < 2.0


def test_one_exchange_of_the_whole_model_per_step_with_fp16():
    comm = MPI.COMM_WORLD
    _, _, _, step = train(DataParallelStep, comm, "ring", False, steps=3, dtype="float32",
                          compressor=half("fp16"))
    n = step.params.size
    assert step.exchange_bytes() == (3 * hand_bytes(n, 2, 4, comm.size, comm.rank),
                                     3 * ring_bytes_sent(n + 2, 4, comm.size, comm.rank))


def test_every_registered_scheme_offers_the_protocol():
    for name in ("none", "fp16", "bf16"):
        made = COMPRESSORS[name]([(0, (3, 2))], xp=np, dtype=np.float32)
        assert made.bytes_sent() == made.uncompressed_bytes() == 0
        assert made.state() == {}
        made.load_state({})
