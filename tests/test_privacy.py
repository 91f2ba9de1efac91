"""DP pieces against their definitions and the accountant against Google's dp-accounting."""

import math

import numpy as np
import pytest

from mpifed.federated.dp import (
    ORDERS,
    adapt_clip,
    clip_update,
    epsilon,
    gaussian_noise,
    rdp_sampled_gaussian,
    split_noise_stddev,
    update_noise_multiplier,
)


def test_clipping_bounds_every_norm():
    rng = np.random.default_rng(0)
    for scale in (0.01, 1.0, 100.0):
        delta = rng.standard_normal(1000) * scale
        clipped, norm = clip_update(delta, clip=2.5)
        assert norm == pytest.approx(np.linalg.norm(delta))
        assert np.linalg.norm(clipped) <= 2.5 + 1e-9
        if norm <= 2.5:
            np.testing.assert_array_equal(clipped, delta)  # small updates pass untouched


def test_noise_stddev_and_split_shares():
    rng = np.random.default_rng(1)
    noise = gaussian_noise(200_000, 0.7, rng)
    assert noise.std() == pytest.approx(0.7, rel=0.01) and abs(noise.mean()) < 0.01
    shares = sum(gaussian_noise(200_000, split_noise_stddev(0.7, 4), rng) for _ in range(4))
    assert shares.std() == pytest.approx(0.7, rel=0.01)


def test_rdp_of_the_unsampled_gaussian_is_alpha_over_2z2():
    assert rdp_sampled_gaussian(1.0, 2.0, 8) == pytest.approx(8 / 8)
    # Subsampling only helps.
    assert rdp_sampled_gaussian(0.1, 2.0, 8) < rdp_sampled_gaussian(1.0, 2.0, 8)


def test_adaptive_clip_moves_toward_the_quantile():
    assert adapt_clip(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.08))  # too many under
    assert adapt_clip(1.0, 0.1, 0.5, 0.2) > 1.0
    assert update_noise_multiplier(1.0, 0.0) == 1.0
    assert update_noise_multiplier(1.0, 5.0) == pytest.approx((1 - 0.01) ** -0.5)
    with pytest.raises(ValueError, match="clip_count_stddev"):
        update_noise_multiplier(1.0, 0.1)


@pytest.mark.parametrize("q,z,rounds,delta", [
    (1.0, 1.1, 10, 1e-5), (0.5, 1.0, 100, 1e-5), (0.1, 1.3, 1000, 1e-6),
    (0.01, 0.8, 5000, 1e-5), (0.25, 4.0, 50, 1e-3),
])
def test_accountant_agrees_with_dp_accounting(q, z, rounds, delta):
    dp_accounting = pytest.importorskip("dp_accounting")
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(ORDERS))
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant.compose(event, rounds)
    reference = accountant.get_epsilon(delta)
    assert epsilon(q, z, rounds, delta) == pytest.approx(reference, rel=0.01)
