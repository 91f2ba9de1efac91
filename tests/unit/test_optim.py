"""Optimisers and schedules against values computed by hand."""

import math

import numpy as np
import pytest

from mpifed.optim import SGD, Adam, learning_rate


def test_sgd_momentum_two_steps():
    w = np.array([1.0, -2.0])
    opt = SGD(momentum=0.9)
    opt.step(w, np.array([0.5, 1.0]), lr=0.1)  # v = g; w -= 0.1 v
    np.testing.assert_allclose(w, [0.95, -2.1])
    opt.step(w, np.array([0.5, 1.0]), lr=0.1)  # v = 0.9 g + g = 1.9 g
    np.testing.assert_allclose(w, [0.95 - 0.095, -2.1 - 0.19])


def test_sgd_nesterov_and_weight_decay():
    w = np.array([2.0])
    opt = SGD(momentum=0.5, nesterov=True, weight_decay=0.1)
    opt.step(w, np.array([1.0]), lr=1.0)  # g = 1 + 0.2 = 1.2; v = 1.2; step = g + 0.5 v = 1.8
    np.testing.assert_allclose(w, [0.2])


def test_adam_first_step_moves_by_lr():
    w = np.array([1.0, 1.0])
    Adam().step(w, np.array([3.0, -0.5]), lr=0.01)  # bias-corrected: m/sqrt(v) = sign(g)
    np.testing.assert_allclose(w, [0.99, 1.01], atol=1e-7)


def test_schedules():
    assert learning_rate(0, 0.4, 100, warmup=4) == pytest.approx(0.1)
    assert learning_rate(3, 0.4, 100, warmup=4) == pytest.approx(0.4)
    assert learning_rate(25, 1.0, 100, "step", step_size=10, gamma=0.5) == pytest.approx(0.25)
    assert learning_rate(50, 1.0, 100, "cosine") == pytest.approx(0.5)
    assert learning_rate(14, 1.0, 24, "cosine", warmup=4) == pytest.approx(
        0.5 * (1 + math.cos(math.pi * 10 / 20)))
    assert learning_rate(7, 0.3, 10) == 0.3


def _expression_adam(w, m, v, g, t, lr, b1=0.9, b2=0.999, eps=1e-8, wd=0.0):
    """Adam as whole-array expressions (the form before the chunked update); returns t."""
    if wd:
        g = g + wd * w
    t += 1
    m *= b1
    m += (1 - b1) * g
    v *= b2
    v += (1 - b2) * g * g
    scale = lr * (1 - b2 ** t) ** 0.5 / (1 - b1 ** t)
    w -= w.dtype.type(scale) * m / (np.sqrt(v) + eps)
    return t


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_in_chunks_equals_expressions_bitwise(dtype, wd):
    """Pieces across CHUNK boundaries (and a ragged end) give the expression form's bits."""
    from mpifed.optim.optimizers import CHUNK

    rng = np.random.default_rng(3)
    n = 2 * CHUNK + 17
    w = rng.standard_normal(n).astype(dtype)
    ref, m, v, t = w.copy(), np.zeros(n, dtype), np.zeros(n, dtype), 0
    opt = Adam(weight_decay=wd)
    for _ in range(3):
        g = rng.standard_normal(n).astype(dtype)
        opt.step(w, g.copy(), lr=0.01)
        t = _expression_adam(ref, m, v, g.copy(), t, 0.01, wd=wd)
    assert np.array_equal(w, ref) and np.array_equal(opt.m, m) and np.array_equal(opt.v, v)


@pytest.mark.parametrize("make", [lambda: Adam(weight_decay=0.01),
                                  lambda: SGD(momentum=0.9, nesterov=True, weight_decay=0.01)])
def test_step_allocates_no_model_sized_temporary(make):
    """After the first step (state allocated), a step allocates at most its chunk scratch."""
    import tracemalloc

    from mpifed.optim.optimizers import CHUNK

    n = 8 * CHUNK
    w, g = np.ones(n, np.float32), np.full(n, 0.5, np.float32)
    opt = make()
    opt.step(w, g.copy(), lr=0.01)
    grad = g.copy()
    tracemalloc.start()
    opt.step(w, grad, lr=0.01)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < n * 4 // 4, f"a step allocated {peak} bytes for a {n * 4}-byte model"
