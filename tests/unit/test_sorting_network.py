"""The sorting networks behind the robust rules: they sort every 0/1 input (so, by the 0-1
principle, every input), give exactly np.sort's and argsort's values over column blocks, leave
NaN to the callers' sort path as Flower's functions handle it, and stay on a (fake) GPU."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from fake_cupy import FakeArray, FakeCupy

import mpifed.federated.sorting_network as sn
import mpifed.xp as xpmod
from mpifed.federated.robust import ROBUST, coordinate_median, fedmedian, fedtrimmedavg
from mpifed.federated.strategies import ServerHyper


def hyper(**given) -> ServerHyper:
    values = dict(server_lr=1.0, beta1=0.9, beta2=0.99, tau=1e-3, trim_fraction=0.2,
                  num_malicious=2, num_selected=4, q=0.2)
    values.update(given)
    return ServerHyper(**values)


@pytest.mark.parametrize("count", range(1, 17))
def test_batcher_network_sorts_every_zero_one_input(count):
    pairs = sn.batcher_pairs(count)
    assert all(0 <= i < j < count for i, j in pairs)
    for bits in itertools.product((0, 1), repeat=count):
        wires = list(bits)
        for i, j in pairs:
            wires[i], wires[j] = min(wires[i], wires[j]), max(wires[i], wires[j])
        assert wires == sorted(bits), bits


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 7 columns, so that every case crosses several blocks and a ragged last one."""
    monkeypatch.setattr(sn, "BLOCK", 7)


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8, 11, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_order_statistics_are_np_sort_values(small_blocks, count, dtype):
    rng = np.random.default_rng(count)
    stacked = rng.standard_normal((count, 45)).astype(dtype)
    stacked[:, :3] = 1.0  # equal values
    stacked[0, 5], stacked[-1, 6] = np.inf, -np.inf
    before = stacked.copy()
    ordered = np.sort(stacked, axis=0)
    np.testing.assert_array_equal(sn.order_statistics(stacked, range(count)), ordered)
    middle = (count // 2,)
    np.testing.assert_array_equal(sn.order_statistics(list(stacked), middle), ordered[middle, :])
    np.testing.assert_array_equal(stacked, before)
    np.testing.assert_array_equal(coordinate_median(list(stacked)), np.median(stacked, axis=0))


@pytest.mark.parametrize("count", [3, 4, 5, 7, 8, 11, 12])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_nearest_values_are_argsorts(small_blocks, count, dtype):
    rng = np.random.default_rng(count)
    stacked = rng.standard_normal((count, 45)).astype(dtype)
    stacked[0, 5] = np.inf
    center = np.median(stacked, axis=0)
    distance = np.abs(stacked - center)
    for beta in range(1, count + 1):
        theirs = np.take_along_axis(stacked, np.argsort(distance, axis=0)[:beta], axis=0)
        ours = sn.nearest_values(stacked, center, beta)
        np.testing.assert_array_equal(np.abs(ours - center), np.sort(distance, axis=0)[:beta])
        if beta == 1 and count % 2 == 0:
            continue  # an even count's two middle values tie: either is the nearest
        # the same values, ties in either order; the two middle ones summed first: same mean
        np.testing.assert_array_equal(np.sort(ours, axis=0), np.sort(theirs, axis=0))
        np.testing.assert_array_equal(ours.mean(axis=0), theirs.mean(axis=0))


def test_a_nan_goes_to_the_sort_path_as_flower():
    agg = pytest.importorskip("flwr.server.strategy.aggregate")
    rng = np.random.default_rng(5)
    models = [rng.standard_normal(30) for _ in range(11)]
    models[3][[2, 17]] = np.nan
    assert sn.order_statistics(models, (5,)) is None
    assert sn.nearest_values(models, np.zeros(30), 3) is None
    results = [(m, 10, 1) for m in models]
    pairs = [([m], 10) for m in models]
    np.testing.assert_array_equal(fedmedian(None, results, {}, hyper())[0],
                                  agg.aggregate_median(pairs)[0])  # NaN where one was
    np.testing.assert_allclose(fedtrimmedavg(None, results, {}, hyper(trim_fraction=0.1))[0],
                               agg.aggregate_trimmed_avg(pairs, 0.1)[0], rtol=1e-12)  # cut off


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan"])
def test_rules_stay_on_the_gpu_in_one_block(monkeypatch, name):
    """On CuPy the rows go through whole (one block): a rule's transfers to the host (its NaN
    checks, Krum's picks) do not grow with the model, its result is a device array equal to
    NumPy's."""
    cp = FakeCupy(devices=1)
    monkeypatch.setattr(xpmod, "cupy_module", lambda: cp)
    monkeypatch.setattr(sn, "BLOCK", 7)  # the host takes 7 blocks of 45 columns, 13 of 90
    rng = np.random.default_rng(6)
    transfers = []
    for size in (45, 90):
        host = [(rng.standard_normal(size), 10 + k, 1, 1.0) for k in range(11)]
        device = [(cp.asarray(m), n, s, loss) for m, n, s, loss in host]
        before = len(cp.of("d2h"))
        ours = ROBUST[name](None, device, {}, hyper())[0]
        transfers.append(len(cp.of("d2h")) - before)
        assert isinstance(ours, FakeArray)
        np.testing.assert_array_equal(np.asarray(ours), ROBUST[name](None, host, {}, hyper())[0])
    assert transfers[0] == transfers[1], transfers
