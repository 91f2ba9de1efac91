"""The robust and fair strategies: equal to Flower's `flwr.server.strategy.aggregate` on random
cases over chained rounds, right on small hand-computed ones, refused where they cannot work
(no MPI)."""

from __future__ import annotations

import numpy as np
import pytest

from mpifed.config import DPConfig, FederatedConfig
from mpifed.config.load import ignored_keys
from mpifed.errors import UserError
from mpifed.federated.robust import (
    ROBUST,
    bulyan,
    check_institution_count,
    fedmedian,
    fedtrimmedavg,
    krum,
    multikrum,
    qfedavg,
)
from mpifed.federated.strategies import STRATEGIES, ServerHyper


def hyper(**given) -> ServerHyper:
    values = dict(server_lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3, trim_fraction=0.2,
                  num_malicious=0, num_selected=0, q=0.2)
    values.update(given)
    return ServerHyper(**values)


# --- Flower, on lists of layers ----------------------------------------------------------------

SHAPES = [(3, 5), (7,), (2, 3, 2), (1,), (4, 1, 3)]  # odd shapes, 47 values in all
SIZE = sum(int(np.prod(s)) for s in SHAPES)


def to_layers(flat):
    """Cut a flat model into SHAPES, as Flower's NDArrays."""
    layers, start = [], 0
    for shape in SHAPES:
        count = int(np.prod(shape))
        layers.append(flat[start:start + count].reshape(shape).copy())
        start += count
    return layers


def to_flat(layers):
    return np.concatenate([np.asarray(layer, dtype=np.float64).ravel() for layer in layers])


def flower_qffl(agg, global_params, results, hp):
    """Flower's QFedAvg.aggregate_fit (flwr 1.42), each institution's own loss in place of the
    one the server evaluates, then aggregate_qffl."""
    def norm_grad(grad_list):
        client_grads = grad_list[0]
        for i in range(1, len(grad_list)):
            client_grads = np.append(client_grads, grad_list[i])
        return float(np.sum(np.square(client_grads)))

    weights_before = to_layers(global_params)
    deltas, hs_ffl = [], []
    for params, _, _, loss in results:
        new_weights = to_layers(params)
        grads = [np.multiply((u - v), 1.0 / hp.server_lr)
                 for u, v in zip(weights_before, new_weights)]
        deltas.append([np.float_power(loss + 1e-10, hp.q) * grad for grad in grads])
        hs_ffl.append(hp.q * np.float_power(loss + 1e-10, (hp.q - 1)) * norm_grad(grads)
                      + (1.0 / hp.server_lr) * np.float_power(loss + 1e-10, hp.q))
    return to_flat(agg.aggregate_qffl(weights_before, deltas, hs_ffl))


def flower_rule(name, global_params, results, hp):
    """Return Flower's aggregate for strategy `name`, hyper-parameters mapped as documented."""
    agg = pytest.importorskip("flwr.server.strategy.aggregate")
    pairs = [(to_layers(r[0]), int(r[1])) for r in results]
    if name == "fedmedian":
        return to_flat(agg.aggregate_median(pairs))
    if name == "fedtrimmedavg":
        return to_flat(agg.aggregate_trimmed_avg(pairs, proportiontocut=hp.trim_fraction))
    if name == "krum":
        return to_flat(agg.aggregate_krum(pairs, num_malicious=hp.num_malicious, to_keep=0))
    if name == "multikrum":
        return to_flat(agg.aggregate_krum(pairs, num_malicious=hp.num_malicious,
                                          to_keep=hp.num_selected))
    if name == "bulyan":  # it pops from the list it is given
        return to_flat(agg.aggregate_bulyan(list(pairs), num_malicious=hp.num_malicious,
                                            aggregation_rule=agg.aggregate_krum, to_keep=0))
    if name == "qfedavg":
        return flower_qffl(agg, global_params, results, hp)
    raise KeyError(name)


def random_round(rng, global_params, count, outliers):
    """Institutions' results around `global_params`: unequal samples, steps and losses, the
    first `outliers` of them far off."""
    results = []
    for k in range(count):
        spread = 25.0 if k < outliers else rng.uniform(0.05, 0.5)
        params = global_params + spread * rng.standard_normal(SIZE)
        results.append((params, int(rng.integers(3, 500)), int(rng.integers(1, 6)),
                        float(rng.uniform(0.05, 3.0))))
    order = rng.permutation(count)  # outliers anywhere in the list
    return [results[i] for i in order]


CASES = [  # (strategy, institutions, outliers, hyper-parameters)
    ("fedmedian", 5, 1, {}), ("fedmedian", 6, 2, {}),
    ("fedtrimmedavg", 5, 1, {"trim_fraction": 0.2}), ("fedtrimmedavg", 9, 2, {"trim_fraction": 0.3}),
    ("fedtrimmedavg", 4, 0, {"trim_fraction": 0.0}),
    ("krum", 5, 1, {"num_malicious": 1}), ("krum", 8, 2, {"num_malicious": 2}),
    ("krum", 4, 0, {"num_malicious": 0}),
    ("multikrum", 6, 1, {"num_malicious": 1, "num_selected": 3}),
    ("multikrum", 9, 2, {"num_malicious": 2, "num_selected": 5}),
    ("multikrum", 5, 1, {"num_malicious": 1, "num_selected": 0}),  # 0: Krum, as Flower
    ("bulyan", 7, 1, {"num_malicious": 1}), ("bulyan", 11, 2, {"num_malicious": 2}),
    ("bulyan", 4, 0, {"num_malicious": 0}),
    ("qfedavg", 5, 0, {"q": 0.2, "server_lr": 0.1}), ("qfedavg", 3, 1, {"q": 1.5, "server_lr": 0.5}),
    ("qfedavg", 4, 0, {"q": 0.0, "server_lr": 1.0}),
]


@pytest.mark.parametrize("name,count,outliers,given", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_flower_over_three_chained_rounds(name, count, outliers, given, seed):
    pytest.importorskip("flwr")
    rng = np.random.default_rng([seed, count, outliers])
    hp = hyper(**given)
    ours = theirs = rng.standard_normal(SIZE)
    for _ in range(3):  # each chain from its own model: a difference would grow
        moves = random_round(rng, np.zeros(SIZE), count, outliers)
        mine = [(ours + m, n, s, loss) for m, n, s, loss in moves]
        flowers = [(theirs + m, n, s, loss) for m, n, s, loss in moves]
        ours, state = STRATEGIES[name](ours, mine, {}, hp)
        assert state == {}
        theirs = flower_rule(name, theirs, flowers, hp)
        np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9, err_msg=name)


@pytest.mark.parametrize("name", sorted(ROBUST))
def test_inputs_are_not_modified(name):
    rng = np.random.default_rng(3)
    glob = rng.standard_normal(SIZE)
    results = random_round(rng, glob, 7, 1)
    before = [r[0].copy() for r in results]
    glob_before = glob.copy()
    new, _ = ROBUST[name](glob, results, {}, hyper(num_malicious=1, num_selected=2))
    for b, r in zip(before, results):
        np.testing.assert_array_equal(b, r[0])
    np.testing.assert_array_equal(glob, glob_before)
    assert not any(np.shares_memory(new, r[0]) for r in results)


# --- by hand -----------------------------------------------------------------------------------

W = np.zeros(2)


def test_fedmedian_by_hand():
    odd = [(np.array([1.0, 5.0]), 1, 1), (np.array([2.0, 0.0]), 50, 1), (np.array([9.0, 3.0]), 2, 1)]
    np.testing.assert_array_equal(fedmedian(W, odd, {}, hyper())[0], [2.0, 3.0])  # unweighted
    even = odd + [(np.array([10.0, 4.0]), 1, 1)]
    np.testing.assert_array_equal(fedmedian(W, even, {}, hyper())[0], [5.5, 3.5])


def test_fedtrimmedavg_by_hand():
    results = [(np.array([v, -v]), n, 1) for v, n in [(1.0, 9), (2.0, 1), (3.0, 1), (100.0, 1)]]
    # int(0.25 * 4) = 1 cut from each side: the mean of 2 and 3, unweighted
    np.testing.assert_allclose(fedtrimmedavg(W, results, {}, hyper(trim_fraction=0.25))[0],
                               [2.5, -2.5])
    np.testing.assert_allclose(fedtrimmedavg(W, results, {}, hyper(trim_fraction=0.2))[0],
                               [26.5, -26.5])  # int(0.8) = 0: nothing cut


KRUM_POINTS = [(np.array([0.0]), 1, 1), (np.array([1.0]), 3, 1), (np.array([3.0]), 1, 1),
               (np.array([10.0]), 1, 1)]
# f = 0, K = 4: each scores its 2 nearest: 0 -> 1 + 9 = 10, 1 -> 1 + 4 = 5, 3 -> 4 + 9 = 13,
# 10 -> 49 + 81 = 130


def test_krum_and_multikrum_by_hand():
    np.testing.assert_array_equal(krum(W[:1], KRUM_POINTS, {}, hyper())[0], [1.0])
    two = multikrum(W[:1], KRUM_POINTS, {}, hyper(num_selected=2))[0]
    np.testing.assert_allclose(two, [(0.0 * 1 + 1.0 * 3) / 4])  # 1 and 0, weighted by samples


def test_bulyan_by_hand():
    honest = [(np.array([v, 10.0 * v]), 1, 1) for v in (0.0, 1.0, 2.0, 3.0, 4.0, 9.0)]
    bad = [(np.array([100.0, -500.0]), 1, 1)]
    # K = 7, f = 1: Krum, on fewer each time, picks theta = 5: 2, 1, 3, 0, 4 (the bad one and 9
    # are left); per coordinate the beta = 3 values nearest their median 2 (20) are 1, 2, 3
    np.testing.assert_allclose(bulyan(W, bad + honest, {}, hyper(num_malicious=1))[0],
                               [2.0, 20.0])
    with pytest.raises(ValueError, match="4 \\* num_malicious \\+ 3 = 7"):
        bulyan(W, honest[:5], {}, hyper(num_malicious=1))


def test_qfedavg_by_hand():
    results = [(np.array([1.0]), 5, 1, 1.0), (np.array([-1.0]), 1, 1, 3.0)]
    # lr 1, q 1: g = -1, +1; Delta = -1, 3; h = 1 + 1 = 2, 1 + 3 = 4: w = 0 - 2 / 6
    new, _ = qfedavg(W[:1], results, {}, hyper(q=1.0, server_lr=1.0))
    np.testing.assert_allclose(new, [-1.0 / 3.0], rtol=1e-8)
    plain, _ = qfedavg(W[:1], results, {}, hyper(q=0.0, server_lr=0.3))
    np.testing.assert_allclose(plain, [0.0], atol=1e-12)  # q = 0: the unweighted mean


# --- refusals and warnings ---------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(ROBUST))
@pytest.mark.parametrize("private", ["secure_aggregation", "dp"])
def test_refused_under_secure_aggregation_and_dp(name, private):
    given = {"secure_aggregation": True} if private == "secure_aggregation" else {
        "dp": DPConfig()}
    with pytest.raises(UserError) as info:
        FederatedConfig(institutions=5, strategy=name, **given)
    message = str(info.value)
    assert "federated.strategy" in message and name in message
    assert ("single update" in message) or ("own loss" in message)
    assert "federated.dp.clip" in message


@pytest.mark.parametrize("name,given,refused,allowed", [
    ("krum", {"num_malicious": 1}, 4, 5),  # K > 2f + 2
    ("multikrum", {"num_malicious": 2, "num_selected": 1}, 6, 7),
    ("bulyan", {"num_malicious": 1}, 6, 7),  # K >= 4f + 3
    ("bulyan", {"num_malicious": 2}, 10, 11),
])
def test_too_few_institutions_for_num_malicious(name, given, refused, allowed):
    fed = FederatedConfig(institutions=refused, strategy=name, **given)
    with pytest.raises(UserError, match="federated.num_malicious"):
        check_institution_count(fed, refused)
    check_institution_count(fed, allowed)


def test_multikrum_selects_no_more_than_the_honest():
    fed = FederatedConfig(institutions=6, strategy="multikrum", num_malicious=1, num_selected=6)
    with pytest.raises(UserError, match="federated.num_selected"):
        check_institution_count(fed, 6)
    check_institution_count(FederatedConfig(institutions=6, strategy="multikrum",
                                            num_malicious=1, num_selected=5), 6)


@pytest.mark.parametrize("key,value", [("trim_fraction", 0.5), ("trim_fraction", -0.1),
                                       ("num_malicious", -1), ("num_selected", -1), ("q", -0.5)])
def test_ranges_name_the_key(key, value):
    with pytest.raises(UserError, match=f"federated.{key}"):
        FederatedConfig(institutions=5, **{key: value})


def test_keys_a_strategy_ignores_are_warned_of():
    given = {"trim_fraction": 0.1, "num_malicious": 1, "num_selected": 2, "q": 1.0,
             "server_lr": 0.5}
    assert ignored_keys(given, "fedtrimmedavg") == [
        m for m in ignored_keys(given, "fedtrimmedavg") if "trim_fraction" not in m]
    assert len(ignored_keys(given, "fedmedian")) == 5
    assert len(ignored_keys(given, "multikrum")) == 3  # reads num_malicious and num_selected
    warned = ignored_keys(given, "krum")
    assert any("num_selected" in m and "multikrum" in m for m in warned)
    assert not any("num_malicious" in m for m in warned)
    assert [m for m in ignored_keys(given, "qfedavg")
            if "federated.q " in m or "server_lr" in m] == []
