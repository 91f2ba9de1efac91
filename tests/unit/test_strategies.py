"""Each strategy against a value computed by hand on tiny arrays (no MPI)."""

import numpy as np
import pytest

from mpifed.federated.robust import ROBUST
from mpifed.federated.strategies import (
    STRATEGIES,
    ServerHyper,
    fedadagrad,
    fedadam,
    fedavg,
    fedavgm,
    fednova,
    fedprox,
    fedyogi,
)

W = np.array([1.0, 2.0])
RESULTS = [(np.array([3.0, 2.0]), 1, 2), (np.array([0.0, 4.0]), 3, 4)]  # p = 1/4, 3/4
HP = ServerHyper(server_lr=0.5, beta1=0.5, beta2=0.75, tau=0.1)


def test_fedavg_weights_by_samples():
    new, state = fedavg(W, RESULTS, {}, HP)
    np.testing.assert_allclose(new, [0.75, 3.5])  # 1/4*[3,2] + 3/4*[0,4]
    assert state == {}
    np.testing.assert_allclose(fedprox(W, RESULTS, {}, HP)[0], [0.75, 3.5])


def test_inputs_are_not_modified():
    before = [r[0].copy() for r in RESULTS]
    for name, fn in STRATEGIES.items():
        if name in ROBUST:  # they read a loss and Bulyan 3 or more: test_robust_strategies.py
            continue
        fn(W, RESULTS, {}, HP)
    for b, (params, _, _) in zip(before, RESULTS):
        np.testing.assert_array_equal(b, params)
    np.testing.assert_array_equal(W, [1.0, 2.0])


def test_fedavgm_momentum():
    # delta = [0.75, 3.5] - [1, 2] = [-0.25, 1.5]
    new, state = fedavgm(W, RESULTS, {}, HP)
    np.testing.assert_allclose(new, W + 0.5 * np.array([-0.25, 1.5]))
    new2, _ = fedavgm(W, RESULTS, state, HP)  # m = 0.5 * delta + delta
    np.testing.assert_allclose(new2, W + 0.5 * 1.5 * np.array([-0.25, 1.5]))


def test_fedadam_fedadagrad_fedyogi_first_round():
    delta = np.array([-0.25, 1.5])
    m = 0.5 * delta
    v0 = np.full(2, 0.01)
    expect = {
        fedadagrad: v0 + delta ** 2,
        fedadam: 0.75 * v0 + 0.25 * delta ** 2,
        fedyogi: v0 - 0.25 * delta ** 2 * np.sign(v0 - delta ** 2),
    }
    for fn, v in expect.items():
        new, state = fn(W, RESULTS, {}, HP)
        np.testing.assert_allclose(new, W + 0.5 * m / (np.sqrt(v) + 0.1), err_msg=fn.__name__)
        np.testing.assert_allclose(state["v"], v)


def test_fednova_normalises_by_steps():
    # d_1 = ([1,2]-[3,2])/2 = [-1, 0]; d_2 = ([1,2]-[0,4])/4 = [0.25, -0.5]
    # tau_eff = 1/4*2 + 3/4*4 = 3.5; sum p d = [-0.25 + 0.1875, -0.375] = [-0.0625, -0.375]
    new, _ = fednova(W, RESULTS, {}, ServerHyper(server_lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3))
    np.testing.assert_allclose(new, W - 3.5 * np.array([-0.0625, -0.375]))


def test_fednova_equals_fedavg_with_equal_steps():
    equal = [(p, n, 3) for p, n, _ in RESULTS]
    np.testing.assert_allclose(fednova(W, equal, {}, ServerHyper(1.0, 0.9, 0.99, 1e-3))[0],
                               fedavg(W, equal, {}, ServerHyper(1.0, 0.9, 0.99, 1e-3))[0])


def test_no_samples_is_an_error():
    with pytest.raises(ValueError, match="at least one sample"):
        fedavg(W, [(W, 0, 1)], {}, HP)
