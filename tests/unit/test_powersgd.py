"""PowerSGD against PyTorch's powerSGD_hook, the exact mean, and its own invariants, with p ranks
simulated by threads (tests/simulated_ranks.py)."""

from __future__ import annotations

import threading
from math import prod

import numpy as np
import pytest
from simulated_ranks import SimulatedRanks

from mpifed.comm.compression.powersgd import (
    PowerSGD,
    gram_schmidt,
    orthogonalize,
    worth_compressing,
)

# (shape as stored, transposed): a conv, its bias, a linear W stored (in, out) and its bias, a
# (16, 32) matrix, and two too small to compress at rate 2: (3, 2) and a conv (5, 3*2*2).
LAYOUT = [((8, 4, 3, 3), False), ((8,), False), ((20, 6), True), ((6,), False),
          ((16, 32), False), ((3, 2), False), ((5, 3, 2, 2), False), ((5,), False)]


def blocks_of(layout):
    """Return (offset, shape, transposed) of each tensor packed in order, and the flat length."""
    blocks, at = [], 0
    for shape, transposed in layout:
        blocks.append((at, shape, transposed))
        at += prod(shape)
    return blocks, at


def rank_grads(length: int, ranks: int, steps: int, dtype, seed: int = 0):
    """Return grads[step][rank]: distinct normal gradients for every rank and step."""
    rng = np.random.default_rng(seed)
    return [[rng.standard_normal(length).astype(dtype) for _ in range(ranks)]
            for _ in range(steps)]


def simulate(blocks, grads, ranges=None, compressors=None, first_step=1, **settings):
    """Run PowerSGD on len(grads[0]) simulated ranks; return (outputs[step][rank], compressors).

    ranges: the (lo, hi) pieces reduced one by one each step (default: the whole buffer).
    """
    ranks = len(grads[0])
    dtype = grads[0][0].dtype
    compressors = compressors or [PowerSGD(blocks, dtype=dtype, **settings) for _ in range(ranks)]
    ranges = ranges or [(0, grads[0][0].size)]

    def work(rank, allreduce_sum):
        out = []
        for k, step_grads in enumerate(grads):
            g = step_grads[rank].copy()
            for lo, hi in ranges:
                compressors[rank].reduce_mean(g[lo:hi], lo, allreduce_sum, ranks, first_step + k)
            out.append(g)
        return out

    per_rank = SimulatedRanks(ranks).run(work)
    return [[per_rank[r][k] for r in range(ranks)] for k in range(len(grads))], compressors


def exact_mean(arrays):
    """Return the mean the way the warm-up computes it: summed in rank order, then divided."""
    total = arrays[0].copy()
    for a in arrays[1:]:
        total += a
    return total / total.dtype.type(len(arrays))


def residual(compressor, length: int):
    """Return the error buffers spread over the flat layout (zero where nothing is compressed)."""
    flat = np.zeros(length, dtype=compressor.dtype)
    error = compressor.state()["error"]
    for m in compressor.matrices:
        flat[m.offset:m.end] = error[m.error_at:m.error_at + m.size]
    return flat


# (a) the peer: PyTorch's hook itself, on p threads that meet in a fake dist.all_reduce.

class _Group:
    """A process group of `size` ranks, this one being `rank`: all the hook asks of it."""

    def __init__(self, rank: int, size: int):
        self.rank, self._size = rank, size

    def size(self) -> int:
        return self._size


class _Bucket:
    """A DDP gradient bucket of one flat tensor holding `shapes`, the only and last bucket."""

    def __init__(self, flat, shapes):
        self.flat, self.shapes = flat, shapes

    def buffer(self):
        return self.flat

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def gradients(self):
        out, at = [], 0
        for shape in self.shapes:
            out.append(self.flat[at:at + prod(shape)].view(shape))
            at += prod(shape)
        return out


def torch_layout(layout):
    """Return the shapes PyTorch holds: a transposed block is (out, in), stored (in, out)."""
    return [tuple(reversed(shape)) if transposed else shape for shape, transposed in layout]


def to_torch_order(flat, layout):
    """Return `flat` (our stored layouts) with each transposed block transposed."""
    out, at = flat.copy(), 0
    for shape, transposed in layout:
        if transposed:
            out[at:at + prod(shape)] = flat[at:at + prod(shape)].reshape(shape).T.reshape(-1)
        at += prod(shape)
    return out


def run_torch_hook(torch, monkeypatch, layout, grads, first_q, rank: int, start: int, eps: float):
    """Drive powerSGD_hook on len(grads[0]) threaded ranks; return per step and rank the
    output, the P and Q memories (flat), and the error (flat, PyTorch's layouts)."""
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as hook

    ranks = len(grads[0])
    shapes = torch_layout(layout)
    slots, barrier = [None] * ranks, threading.Barrier(ranks, timeout=60)

    def all_reduce(tensor, group=None, async_op=False):
        slots[group.rank] = tensor
        barrier.wait()
        total = slots[0].clone()
        for other in slots[1:]:
            total += other
        barrier.wait()
        tensor.copy_(total)
        fut = torch.futures.Future()
        fut.set_result([tensor])
        return type("Work", (), {"get_future": lambda self: fut})()

    q_iter = {}  # thread -> our first Q, matrix after matrix, in place of torch.randn's draws

    def randn(*shape, device=None, dtype=None):
        return next(q_iter[threading.get_ident()]).reshape(shape).to(dtype)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(hook.torch, "randn", randn)

    def work(r):
        q_iter[threading.get_ident()] = iter(first_q)
        state = hook.PowerSGDState(process_group=_Group(r, ranks), matrix_approximation_rank=rank,
                                   start_powerSGD_iter=start, orthogonalization_epsilon=eps)
        out = []
        for step_grads in grads:
            flat = torch.from_numpy(to_torch_order(step_grads[r], layout))
            result = hook.powerSGD_hook(state, _Bucket(flat, shapes)).wait()
            memories = [state.p_memory_dict.get(0), state.q_memory_dict.get(0),
                        state.error_dict.get(0)]
            out.append([result.numpy().copy()]
                       + [None if t is None else t.numpy().copy() for t in memories])
        return out

    results, errors = [None] * ranks, []

    def one(r):
        try:
            results[r] = work(r)
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=one, args=(r,)) for r in range(ranks)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# float32 differs by BLAS rounding (matmul, and a dot where PyTorch sums a product), which warm
# start and error feedback carry on: 3e-7 at the first compressed step, 1.7e-6 at the fourth.
# float64 shows the algorithm is the same: 1e-14 after four compressed steps.
# Rank 4 takes PyTorch's QR path.
@pytest.mark.parametrize("rank", [2, 4])
@pytest.mark.parametrize("dtype, steps, tol", [("float32", 4, 1e-6), ("float64", 6, 1e-12)])
def test_p_and_q_equal_pytorchs_powersgd_hook(monkeypatch, rank, dtype, steps, tol):
    torch = pytest.importorskip("torch")
    from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

    ranks, start = 3, 2
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, ranks, steps, dtype)
    ours, compressors = simulate(blocks, grads, rank=rank, start=start)
    psgd = compressors[0]
    torch_shapes = torch_layout(LAYOUT)
    picked = [_should_compress(s[0], prod(s[1:]), min(s[0], prod(s[1:]), rank), 2)[0]
              for s in torch_shapes]
    assert [(o, tuple(s)) for (o, s, _), p in zip(blocks, picked) if p] == \
        [(m.offset, m.shape) for m in psgd.matrices]  # the same rule picks the same tensors

    first = PowerSGD(blocks, rank=rank, start=start, dtype=dtype).state()["q"]
    first_q = [torch.from_numpy(first[m.q_at:m.q_at + m.cols * m.rank].copy())
               for m in psgd.matrices]
    theirs = run_torch_hook(torch, monkeypatch, LAYOUT, grads, first_q, rank, start,
                            psgd.epsilon)

    for k, r in ((k, r) for k in range(steps) for r in range(ranks)):
        out, p_mem, q_mem, error = theirs[r][k]
        np.testing.assert_allclose(to_torch_order(ours[k][r], LAYOUT), out, rtol=tol, atol=tol)
        if k + 1 < steps:
            continue  # P and Q of the last step only: factors() holds the latest
        p_at = q_at = 0
        mine = residual(compressors[r], length)
        for m in psgd.matrices:  # torch's P and Q memories: compressed tensors in order
            p, q = compressors[r].factors(m.offset)
            np.testing.assert_allclose(p.reshape(-1), p_mem[p_at:p_at + p.size], rtol=tol,
                                       atol=tol)
            np.testing.assert_allclose(q.reshape(-1), q_mem[q_at:q_at + q.size], rtol=tol,
                                       atol=tol * 10)
            p_at, q_at = p_at + p.size, q_at + q.size
            np.testing.assert_allclose(to_torch_order(mine, LAYOUT)[m.offset:m.end],
                                       error[m.offset:m.end], rtol=tol, atol=tol * 10)
        assert p_at == p_mem.size and q_at == q_mem.size


# (b) full rank, every matrix compressed: the exact mean.

@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_full_rank_with_min_rate_0_is_the_exact_mean(ranks):
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, ranks, 4, "float32", seed=ranks)
    full = max(min(s[0], prod(s[1:])) for s, _ in LAYOUT if len(s) > 1)
    ours, compressors = simulate(blocks, grads, rank=full, min_rate=0.0, start=0)
    assert len(compressors[0].matrices) == sum(len(s) > 1 for s, _ in LAYOUT)
    for k, step_grads in enumerate(grads):
        want = np.mean(np.stack(step_grads).astype(np.float64), axis=0)
        for r in range(ranks):
            np.testing.assert_allclose(ours[k][r], want, atol=1e-5, rtol=1e-5,
                                       err_msg=f"step {k + 1}, rank {r}")


# (c) error feedback telescopes.

@pytest.mark.parametrize("dtype, tol", [("float64", 1e-10), ("float32", 1e-5)])
@pytest.mark.parametrize("ranks", [1, 3])
def test_error_feedback_telescopes(ranks, dtype, tol):
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, ranks, 7, dtype, seed=7)
    ours, compressors = simulate(blocks, grads, rank=1, start=2)
    applied = np.sum([ours[k][0] for k in range(len(grads))], axis=0, dtype=np.float64)
    true = np.sum([np.mean(g, axis=0, dtype=np.float64) for g in grads], axis=0)
    left = np.mean([residual(c, length) for c in compressors], axis=0, dtype=np.float64)
    assert np.abs(left).max() > 1e-2  # rank 1 leaves something out
    np.testing.assert_allclose(applied + left, true, atol=tol, rtol=tol)


# (d) the warm-up is the exact mean and leaves the state alone.

def test_warm_up_steps_are_exact_and_keep_the_state():
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, 3, 4, "float32", seed=3)
    ours, compressors = simulate(blocks, grads, start=4)
    fresh = PowerSGD(blocks).state()
    for k, step_grads in enumerate(grads):
        for r in range(3):
            np.testing.assert_array_equal(ours[k][r], exact_mean(step_grads))
    for c in compressors:
        np.testing.assert_array_equal(c.state()["q"], fresh["q"])
        assert not c.state()["error"].any()
        assert c.uncompressed_bytes() == c.bytes_sent() == round(4 * length * 4 * 4 / 3)


# (e) zero columns stay zero.

def test_gram_schmidt_keeps_a_zero_column_zero():
    a = np.array([[0.0, 1.0, 2.0], [0.0, 3.0, 1.0], [0.0, 0.5, 4.0], [0.0, 1.0, 1.0]],
                 dtype=np.float32)
    gram_schmidt(a)
    assert np.isfinite(a).all() and not a[:, 0].any()
    np.testing.assert_allclose(a[:, 1:].T @ a[:, 1:], np.eye(2), atol=1e-6)
    b = np.zeros((4, 2), np.float32)
    orthogonalize(b)  # rank 2: Gram-Schmidt
    assert not b.any()


def test_qr_above_rank_2_gives_no_nan_on_zero_columns():
    a = np.zeros((5, 3), np.float32)
    a[:, 1] = [1, 2, 3, 4, 5]
    orthogonalize(a)
    assert np.isfinite(a).all()
    np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-6)


def test_zero_gradients_give_zeros_not_nan():
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, 2, 3, "float32")
    grads[1] = [np.zeros(length, np.float32) for _ in range(2)]  # the first compressed step
    ours, compressors = simulate(blocks, grads, start=1)
    assert all(np.isfinite(g).all() for step in ours for g in step)
    assert not ours[1][0].any()
    assert all(np.isfinite(c.state()["q"]).all() for c in compressors)
    for m in compressors[0].matrices:  # the zero Q restarted: the next step is approximated
        assert np.abs(ours[2][0][m.offset:m.end]).max() > 0.1


# (f) bytes: the goals, layer-wise.

def ratio_of(shapes, rank: int = 2, ranks: int = 3, layer_wise: bool = True):
    """Return uncompressed over sent bytes of one compressed step on `shapes` (packed in order)."""
    blocks, length = blocks_of([(s, False) for s in shapes])
    ranges = [(o, o + prod(s)) for o, s, _ in blocks] if layer_wise else None
    grads = rank_grads(length, ranks, 1, "float32")
    _, compressors = simulate(blocks, grads, ranges=ranges, rank=rank, start=0)
    c = compressors[0]
    sent = sum((m.rows + m.cols) * m.rank - m.size for m in c.matrices) + length
    assert c.bytes_sent() == round(sent * 4 * 2 * (ranks - 1) / ranks)  # counted as computed
    assert c.uncompressed_bytes() == round(length * 4 * 2 * (ranks - 1) / ranks)
    return c.uncompressed_bytes() / c.bytes_sent()


def mlp_shapes(sizes):
    """Return W (in, out) and b (out,) of each linear layer, as mpifed stores them."""
    return [s for a, b in zip(sizes, sizes[1:]) for s in ((a, b), (b,))]


def test_mlp_64_512_256_10_sends_over_20x_less_at_rank_2():
    ratio = ratio_of(mlp_shapes([64, 512, 256, 10]))
    assert ratio >= 20
    assert ratio == pytest.approx(167178 / 3998, rel=1e-4)  # 41.8x: three matrices and 778 biases


def test_resnet8_sends_over_10x_less_at_rank_2():
    from mpifed.nn.presets import resnet

    shapes = resnet((3, 32, 32), 10, 8).layout().shapes
    ratio = ratio_of(shapes)
    assert ratio >= 10
    assert ratio == pytest.approx(78666 / (4138 + 1306), rel=1e-4)  # 14.4x: every conv and the linear


def test_layer_by_layer_equals_the_whole_buffer_at_once():
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, 3, 4, "float32", seed=5)
    ranges = [(o, o + prod(s)) for o, s, _ in blocks]
    whole, a = simulate(blocks, grads, start=1)
    pieces, b = simulate(blocks, grads, ranges=ranges, start=1)
    for k in range(len(grads)):
        for r in range(3):
            np.testing.assert_array_equal(whole[k][r], pieces[k][r])
    np.testing.assert_array_equal(a[0].state()["error"], b[0].state()["error"])


def test_a_range_that_cuts_a_matrix_is_refused():
    blocks, _ = blocks_of(LAYOUT)
    psgd = PowerSGD(blocks, start=0)
    with pytest.raises(ValueError, match=r"cuts the matrix at offset 0 \(shape \(8, 4, 3, 3\)\)"):
        psgd.reduce_mean(np.zeros(100, np.float32), 0, lambda buf: None, 1, 1)


# (g) checkpoints.

def test_state_round_trip_continues_bit_identically():
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, 3, 8, "float32", seed=11)
    _, before = simulate(blocks, grads[:4], start=2)
    saved = [c.state() for c in before]
    after, _ = simulate(blocks, grads[4:], compressors=before, first_step=5)
    resumed = [PowerSGD(blocks, start=2, seed=99) for _ in range(3)]  # another seed: state wins
    for c, s in zip(resumed, saved):
        c.load_state({k: v.copy() for k, v in s.items()})
    again, _ = simulate(blocks, grads[4:], compressors=resumed, first_step=5)
    for k in range(4):
        for r in range(3):
            np.testing.assert_array_equal(after[k][r], again[k][r])
    for c, d in zip(before, resumed):
        for key in ("q", "error"):
            np.testing.assert_array_equal(c.state()[key], d.state()[key])


def test_a_state_of_another_model_is_refused():
    blocks, _ = blocks_of(LAYOUT)
    psgd = PowerSGD(blocks)
    with pytest.raises(ValueError, match="'q' has 3 elements"):
        psgd.load_state({"q": np.zeros(3), "error": psgd.state()["error"]})
    with pytest.raises(ValueError, match="no 'error'"):
        psgd.load_state({"q": psgd.state()["q"]})


def test_the_rule_is_pytorchs():
    assert worth_compressing(64, 512, 2, 2.0)
    assert not worth_compressing(3, 2, 2, 2.0)
    assert not worth_compressing(5, 12, 2, 2.0)  # 68 >= 60
    assert worth_compressing(5, 12, 2, 0.0)


# One xp path: device arrays in, device arrays out, nothing read back to the host.

def test_device_arrays_take_the_same_path_without_host_transfers(monkeypatch):
    from fake_cupy import FakeCupy

    from mpifed import xp as xpmod

    fake = FakeCupy(devices=1)
    monkeypatch.setattr(xpmod, "cupy_module", lambda: fake)
    blocks, length = blocks_of(LAYOUT)
    grads = rank_grads(length, 2, 4, "float32", seed=13)
    on_host, _ = simulate(blocks, grads, start=1, rank=4)
    device = [[fake.asarray(g) for g in step] for step in grads]
    compressors = [PowerSGD(blocks, start=1, rank=4, xp=fake) for _ in range(2)]
    fake.calls.clear()
    on_device, _ = simulate(blocks, device, compressors=compressors)
    assert not fake.of("d2h"), fake.of("d2h")
    for k in range(len(grads)):
        for r in range(2):
            assert type(on_device[k][r]).__name__ == "FakeArray"
            np.testing.assert_array_equal(np.asarray(on_device[k][r]), on_host[k][r])
    assert type(compressors[0].state()["q"]).__name__ == "FakeArray"
