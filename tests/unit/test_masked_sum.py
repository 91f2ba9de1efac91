"""A private round's vectors (issue 23): under DP the ring's range covers the clip, a NaN or Inf
update is a zero one over the clip, and secure_out_of_range = "clip" clips the update before its
noise share is added, so the noise reaches the sum uncut (the release stays Gaussian)."""

import numpy as np
import pytest

from mpifed.config import resolve
from mpifed.federated.dp import share_stddev
from mpifed.federated.exchange import SiteReport
from mpifed.federated.masked_sum import (
    NOISE_SIGMAS,
    RANGE_CODE,
    MaskedSum,
    PreparedRound,
    leader_vector,
    ring_scales,
)
from mpifed.federated.secagg import new_keypair

SIZE = 64


def federated(dp=None, **keys):
    return resolve({"data": {"train": "site-{institution}.h5"},
                    "federated": {"institutions": 2, "secure_aggregation": True,
                                  "min_participants": 1, **keys,
                                  **({"dp": dp, "keys": "keys"} if dp else {})}}).federated


@pytest.mark.parametrize("secure_range, clip", [(0.1, 2.0), (3.0, 2.0)])
def test_under_dp_the_range_is_the_larger_of_secure_range_and_the_clip_plus_8_sigma(
        secure_range, clip):
    fed_cfg = federated({"clip": clip, "noise_multiplier": 1.0}, secure_range=secure_range)
    bound, _, _ = ring_scales(fed_cfg, fed_cfg.dp, 4, clip)
    share = share_stddev(1.0 * clip, 4 - 1)
    assert bound == pytest.approx(max(secure_range, clip) + NOISE_SIGMAS * share, rel=1e-15)


def test_without_dp_the_range_is_secure_range_times_the_largest_weight():
    fed_cfg = federated(secure_range=0.5, secure_max_samples=100)
    assert ring_scales(fed_cfg, None, 3)[0] == 50.0


def test_under_dp_a_non_finite_update_is_a_zero_one_over_the_clip():
    fed_cfg = federated({"clip": 1.0, "noise_multiplier": 1.0, "adaptive": True,
                         "clip_count_stddev": 2.0})
    dp, update = fed_cfg.dp, np.full(SIZE, 1e-3)
    update[5] = np.nan
    vector = leader_vector(update, np.zeros(SIZE), SiteReport(), 1.0, dp, 1.0)
    np.testing.assert_array_equal(vector, [0.0] * SIZE + [-0.5])  # over the clip: b = 0
    update[5] = np.inf
    masked = MaskedSum(fed_cfg, dp, 0)
    into = np.zeros(SIZE + 1)
    tail = masked.add_update(into, update, np.zeros(SIZE), SiteReport(),
                             PreparedRound(0, [0, 1], 1.0, SIZE))
    np.testing.assert_array_equal(into, 0.0)
    assert tail == [-0.5]


def two_leaders_round(fed_cfg, updates, clip, report=None):
    """Return (the root's decoded sum, the sum of the noise shares drawn) for two leaders."""
    keys = {k: new_keypair() for k in (0, 1)}
    publics = {k: public for k, (_, public) in keys.items()}
    ready = PreparedRound(7, [0, 1], clip, SIZE, dict(publics))
    total, noise = None, np.zeros(SIZE)
    for k in (0, 1):
        masked = MaskedSum(fed_cfg, fed_cfg.dp, k)
        masked.draw_mask_and_noise(keys[k][0], ready)
        noise += masked.buffers.array("vector", np.float64, SIZE)[:SIZE]
        ring, code = masked.masked_ring(updates[k], np.zeros(SIZE), report or SiteReport(), True,
                                         ready)
        assert code == 0
        total = ring.copy() if total is None else np.add(total, ring, out=total)
    return masked.decode_sum(total, 2, ready)[:SIZE], noise


@pytest.mark.parametrize("mode", ["clip", "error"])
def test_the_noise_reaches_the_sum_uncut_when_the_clip_exceeds_secure_range(mode):
    """C = 1 above secure_range = 0.1: each leader's clipped update (+-1 on one coordinate)
    plus its noise share is encoded exactly. Before, the range was secure_range + 8 sigma:
    "clip" cut update and noise together (no longer a Gaussian mechanism), "error" refused."""
    fed_cfg = federated({"clip": 1.0, "noise_multiplier": 0.05}, secure_range=0.1,
                        secure_out_of_range=mode)
    first, second = np.zeros(SIZE), np.zeros(SIZE)
    first[0], second[1] = 3.0, -5.0  # clipped to norm 1: +1 and -1
    got, noise = two_leaders_round(fed_cfg, {0: first, 1: second}, 1.0)
    expected = noise.copy()
    expected[0] += 1.0
    expected[1] -= 1.0
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)


def test_without_dp_clip_mode_clips_the_update_and_error_mode_refuses_with_a_code():
    updates = {0: np.full(SIZE, 0.5), 1: np.full(SIZE, -0.01)}
    updates[0][3] = 7.0  # weight 1 (samples) * 7 > secure_max_samples * secure_range = 2
    clipped = federated(secure_range=2.0, secure_max_samples=1, secure_out_of_range="clip")
    report = SiteReport(samples=1.0)
    got, _ = two_leaders_round(clipped, updates, 0.0, report)
    expected = np.full(SIZE, 0.49)
    expected[3] = 2.0 - 0.01
    np.testing.assert_allclose(got, expected, atol=1e-9)
    refused = federated(secure_range=2.0, secure_max_samples=1)
    masked = MaskedSum(refused, None, 0)
    keys = {k: new_keypair() for k in (0, 1)}
    ready = PreparedRound(0, [0, 1], 0.0, SIZE, {k: pub for k, (_, pub) in keys.items()})
    masked.draw_mask_and_noise(keys[0][0], ready)
    assert masked.masked_ring(updates[0], np.zeros(SIZE), report, True, ready) == (None,
                                                                                 RANGE_CODE)
