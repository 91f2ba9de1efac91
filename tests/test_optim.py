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
