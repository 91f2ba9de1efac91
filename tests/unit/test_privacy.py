"""DP pieces against their definitions and the accountants against Google's dp-accounting."""

import logging
import math
import sys

import numpy as np
import pytest

from mpifed.config import DPConfig
from mpifed.errors import UserError
from mpifed.federated.dp import (
    adapt_clip,
    clip_update,
    epsilon,
    pld_epsilon,
    rdp_sampled_gaussian,
    secure_bernoulli,
    secure_gaussian,
    share_stddev,
    update_noise_multiplier,
)
from mpifed.federated.exchange import SiteReport
from mpifed.federated.ledger import PrivacyLedger, ledger_epsilon, release_entry
from mpifed.federated.masked_sum import leader_vector, tail_fields
from mpifed.train.setup import set_aside_finished_run

logging.getLogger("absl").setLevel(logging.ERROR)


def reference_epsilon(events, delta, accountant="rdp"):
    """dp-accounting's epsilon of [(q, z, count)], composed (default orders)."""
    dp_accounting = pytest.importorskip("dp_accounting")
    acc = (dp_accounting.pld.PLDAccountant() if accountant == "pld"
           else dp_accounting.rdp.RdpAccountant())
    for q, z, count in events:
        event = dp_accounting.GaussianDpEvent(z)
        if q < 1:
            event = dp_accounting.PoissonSampledDpEvent(q, event)
        acc.compose(event, count)
    return acc.get_epsilon(delta)


def test_clipping_bounds_every_norm():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        delta = rng.standard_normal(1000) * scale
        clipped, norm = clip_update(delta, clip=2.5)
        assert norm == pytest.approx(np.linalg.norm(delta))
        assert np.linalg.norm(clipped) <= 2.5 + 1e-9
        if norm <= 2.5:
            np.testing.assert_array_equal(clipped, delta)  # small updates pass untouched


def test_secure_noise_is_gaussian_and_never_repeats():
    noise = secure_gaussian(400_001, 0.7)
    assert noise.size == 400_001
    assert noise.std() == pytest.approx(0.7, rel=0.01) and abs(noise.mean()) < 0.005
    assert np.mean((noise / 0.7) ** 4) == pytest.approx(3.0, rel=0.03)  # Gaussian kurtosis
    assert np.mean(np.abs(noise) < 0.7) == pytest.approx(0.6827, abs=0.005)
    assert not np.array_equal(secure_gaussian(10, 1.0), secure_gaussian(10, 1.0))
    draws = [secure_bernoulli(0.3) for _ in range(20_000)]
    assert np.mean(draws) == pytest.approx(0.3, abs=0.015)


def test_noise_does_not_come_from_a_seeded_generator(monkeypatch):
    """Item 4: all DP noise from the OS's CSPRNG; numpy's generators are never asked."""
    def refuse(*args, **kwargs):
        raise AssertionError("numpy generator used for DP noise")

    monkeypatch.setattr(np.random, "default_rng", refuse)
    monkeypatch.setattr(np.random, "Generator", refuse)
    assert secure_gaussian(1000, 1.0).std() > 0.5


@pytest.mark.parametrize("leaders,colluders", [(4, 0), (5, 1), (8, 2), (3, 1)])
def test_the_shares_the_root_and_colluders_do_not_know_carry_the_full_noise(leaders,
                                                                           colluders):
    """Item 4: leaders - 1 - colluders shares alone sum to the full stddev."""
    honest = leaders - 1 - colluders
    share = share_stddev(0.7, honest)
    unknown = sum(secure_gaussian(200_000, share) for _ in range(honest))
    assert unknown.std() == pytest.approx(0.7, rel=0.01)


def test_adaptive_clip_moves_toward_the_quantile():
    assert adapt_clip(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.08))  # too many under
    assert adapt_clip(1.0, 0.1, 0.5, 0.2) > 1.0
    assert update_noise_multiplier(1.0, 0.0) == 1.0
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        update_noise_multiplier(1.0, 0.1)


def test_the_adaptive_epsilon_is_that_of_the_two_mechanisms_actually_run():
    """Item 1: the count's sensitivity is read off what leaders send; the epsilon the run
    reports equals dp-accounting's for Gaussian(z_update) composed with Gaussian(sigma_b /
    sensitivity)."""
    dp = DPConfig(clip=1.0, adaptive=True, noise_multiplier=1.2, clip_count_stddev=1.0,
                  delta=1e-5, accountant="rdp")
    size, global_host = 10, np.zeros(10)
    under = leader_vector(np.full(size, 0.01), global_host, SiteReport(), 1.0, dp, 1.0)
    over = leader_vector(np.full(size, 10.0), global_host, SiteReport(), 1.0, dp, 1.0)
    assert tail_fields(dp) == ("under_clip",) and under.size == size + 1
    # Add/remove adjacency (the Poisson-sampled accountant's): one institution changes the
    # count by its own contribution at most.
    sensitivity = max(abs(under[-1]), abs(over[-1]))
    z_update = update_noise_multiplier(1.2, 1.0)
    rounds = 10
    reference = reference_epsilon([(1.0, z_update, rounds), (1.0, 1.0 / sensitivity, rounds)],
                                  1e-5)
    entries = [release_entry(dp, r, 1.0, None) for r in range(rounds)]
    reported, _ = ledger_epsilon(dp, entries, 4)
    assert reported == pytest.approx(reference, rel=1e-6)


def test_no_loss_and_no_weight_leave_an_institution_under_dp():
    """Items 2 and 10: under DP the vector is the clipped update (+ b - 1/2 if adaptive)."""
    report = SiteReport(samples=17, steps=3, loss=0.123)
    fixed = DPConfig(adaptive=False)
    vector = leader_vector(np.ones(4), np.zeros(4), report, 1.0, fixed, 100.0)
    np.testing.assert_array_equal(vector, np.ones(4))  # the update only: no loss, no count
    plain = leader_vector(np.ones(4), np.zeros(4), report, 17.0, None, 0.0)
    np.testing.assert_allclose(plain[-2:], [17 * 0.123, 17.0])


def test_an_update_with_nan_is_refused_before_encoding():
    with pytest.raises(UserError, match="NaN or Inf"):
        leader_vector(np.array([1.0, np.nan]), np.zeros(2), SiteReport(), 1.0, None, 0.0)


def test_rdp_of_the_unsampled_gaussian_is_alpha_over_2z2():
    assert rdp_sampled_gaussian(1.0, 2.0, 8) == pytest.approx(8 / 8)
    assert rdp_sampled_gaussian(0.1, 2.0, 8) < rdp_sampled_gaussian(1.0, 2.0, 8)


@pytest.mark.parametrize("q,z,rounds,delta", [
    (1.0, 1.0, 10, 1e-5), (1.0, 1.1, 10, 1e-5), (0.5, 1.0, 100, 1e-5), (0.1, 1.3, 1000, 1e-6),
    (0.01, 0.8, 5000, 1e-5), (0.25, 4.0, 50, 1e-3),
])
def test_accountant_agrees_with_dp_accounting_default_orders(q, z, rounds, delta):
    """Item 7: the default RdpAccountant (fractional orders included), within 1%."""
    reference = reference_epsilon([(q, z, rounds)], delta)
    assert epsilon(q, z, rounds, delta) == pytest.approx(reference, rel=0.01)


def test_pld_is_dp_accountings_and_tighter():
    pld = pld_epsilon({(0.5, 1.0): 20}, 1e-5)
    assert pld == pytest.approx(reference_epsilon([(0.5, 1.0, 20)], 1e-5, "pld"), rel=1e-9)
    assert pld < 0.95 * epsilon(0.5, 1.0, 20, 1e-5)


def test_pld_without_dp_accounting_names_the_package(monkeypatch):
    for name in [m for m in sys.modules if m.startswith("dp_accounting")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "dp_accounting", None)
    with pytest.raises(UserError, match="dp-accounting"):
        pld_epsilon({(1.0, 1.0): 3}, 1e-5)


def test_per_institution_epsilon_counts_each_ones_rounds_without_amplification():
    """Item 3, without secure aggregation: institution k's epsilon is the unsampled
    Gaussian's over the rounds k took part in; the record's epsilon is the largest."""
    dp = DPConfig(noise_multiplier=1.3, delta=1e-5, accountant="rdp")
    taken = [[0, 1], [1], [1, 2], [0, 1, 2], [1]]
    entries = [release_entry(dp, r, 0.5, chosen) for r, chosen in enumerate(taken)]
    largest, each = ledger_epsilon(dp, entries, 4)
    counts = [sum(k in c for c in taken) for k in range(4)]
    assert counts == [2, 5, 2, 0]
    expected = [reference_epsilon([(1.0, 1.3, n)], 1e-5) if n else 0.0 for n in counts]
    assert each == pytest.approx(expected, rel=1e-6)
    assert largest == max(each)


def test_the_ledger_is_append_only_and_read_back(tmp_path):
    dp = DPConfig(noise_multiplier=1.0, delta=1e-5, accountant="rdp")
    ledger = PrivacyLedger(str(tmp_path))
    for r in (0, 1, 1):  # round 2 replayed after a crash
        ledger.append(release_entry(dp, r, 1.0, None))
    again = PrivacyLedger(str(tmp_path))
    assert [e["round"] for e in again.entries] == [1, 2, 2]
    assert ledger_epsilon(dp, again.entries, 2)[0] == pytest.approx(epsilon(1.0, 1.0, 3, 1e-5))


def test_a_new_run_after_a_finished_one_keeps_composing_the_ledger(tmp_path):
    """Its model may continue from the finished run's checkpoints: no release may be forgotten."""
    dp = DPConfig(noise_multiplier=1.0, delta=1e-5, accountant="rdp")
    PrivacyLedger(str(tmp_path)).append(release_entry(dp, 0, 1.0, None))
    (tmp_path / "model.h5").write_bytes(b"a finished run's model")
    set_aside_finished_run(str(tmp_path))
    assert not (tmp_path / "model.h5").exists()  # the model is set aside, the ledger is not
    assert [e["round"] for e in PrivacyLedger(str(tmp_path)).entries] == [1]


def test_secure_noise_matches_the_normal_cdf_and_fills_all_four_quadrants():
    """The quadrant-folded Box-Muller: each half follows math.erf's normal CDF, the cosine and
    sine halves are uncorrelated, and their sign pairs land in the four quadrants alike."""
    count = 1_000_000
    noise = secure_gaussian(count, 1.0)
    for z in (-3.0, -1.5, -0.5, 0.0, 0.7, 2.0):
        want = 0.5 * (1 + math.erf(z / math.sqrt(2)))
        assert np.mean(noise < z) == pytest.approx(want, abs=0.002)
    cosines, sines = noise[:count // 2], noise[count // 2:]
    assert abs(np.corrcoef(cosines, sines)[0, 1]) < 0.005
    quadrant = (cosines > 0).astype(int) * 2 + (sines > 0)
    assert np.all(np.abs(np.bincount(quadrant, minlength=4) / (count // 2) - 0.25) < 0.004)
    odd = secure_gaussian(7, 1.0, out=np.full(9, np.nan))  # odd counts and a longer out
    assert odd.shape == (7,) and np.all(np.isfinite(odd))
