"""Institution-level differential privacy: clipping, Gaussian noise, adaptive clipping, and an
RDP accountant. Pure functions on arrays; no MPI.

DP-FedAvg (McMahan et al. 2018): each institution's update (its model minus the global model) is
clipped to L2 norm `clip`; Gaussian noise of standard deviation noise_multiplier * clip is added
to the sum; the sum is divided by the fixed denominator q * K (every weight is 1, the paper's
bound w_k <= 1), so one institution changes the result by at most clip / (q K).
Adaptive clipping (Andrew et al. 2021): the clip follows the target quantile of the unclipped
norms, estimated from a noised count of institutions whose norm was under the clip.
Accounting (Mironov 2017; Mironov, Talwar, Zhang 2019): the Poisson-sampled Gaussian mechanism
at integer orders alpha, composed over rounds, converted to (epsilon, delta).
"""

from __future__ import annotations

import math

import numpy as np

ORDERS = tuple(range(2, 65)) + (80, 96, 128, 192, 256, 512, 1024)  # integer RDP orders


def clip_update(delta: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """Return (delta scaled to L2 norm <= clip, its norm before clipping)."""
    norm = float(np.linalg.norm(delta))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return delta * scale, norm


def gaussian_noise(shape, stddev: float, rng) -> np.ndarray:
    """Return N(0, stddev^2) noise of `shape` from `rng` (a numpy Generator)."""
    return rng.normal(0.0, stddev, size=shape) if stddev > 0 else np.zeros(shape)


def split_noise_stddev(stddev: float, shares: int) -> float:
    """Return the stddev each of `shares` parties adds so that their sum has `stddev`."""
    return stddev / math.sqrt(max(shares, 1))


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Return the multiplier left for the updates when the clip count also spends privacy.

    Andrew et al. (2021), Theorem 1: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2).
    """
    if count_stddev <= 0:
        return noise_multiplier
    rest = noise_multiplier ** -2 - (2 * count_stddev) ** -2
    if rest <= 0:
        least = 1 / (2 * noise_multiplier)
        raise ValueError(f"federated.dp.clip_count_stddev {count_stddev} uses up the whole "
                         f"noise_multiplier {noise_multiplier}; raise it (above {least:.3g})")
    return rest ** -0.5


def adapt_clip(clip: float, noised_fraction_under: float, target_quantile: float,
               learning_rate: float) -> float:
    """Geometric update C <- C exp(-eta (b - gamma)) toward the target quantile gamma."""
    return clip * math.exp(-learning_rate * (noised_fraction_under - target_quantile))


def _log_add(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: int) -> float:
    """Return the RDP at integer `order` of one Poisson-sampled Gaussian mechanism.

    q = 1: order / (2 z^2). Otherwise log(A) / (order - 1) with
    A = sum_i C(order, i) (1-q)^(order-i) q^i exp((i^2 - i) / (2 z^2)), summed in log space.
    """
    z = noise_multiplier
    if q == 0:
        return 0.0
    if q >= 1.0:
        return order / (2 * z * z)
    log_a = -math.inf
    for i in range(order + 1):
        term = (math.lgamma(order + 1) - math.lgamma(i + 1) - math.lgamma(order - i + 1)
                + i * math.log(q) + (order - i) * math.log1p(-q) + (i * i - i) / (2 * z * z))
        log_a = _log_add(log_a, term)
    return log_a / (order - 1)


def epsilon(q: float, noise_multiplier: float, rounds: int, delta: float,
            orders=ORDERS) -> float:
    """Return epsilon after `rounds` compositions at `delta` (minimised over the orders).

    Conversion as in Google's dp-accounting (Canonne, Kamath, Steinke 2020):
    eps = rdp + log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1).
    """
    if rounds == 0 or q == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    best = math.inf
    for alpha in orders:
        rdp = rounds * rdp_sampled_gaussian(q, noise_multiplier, alpha)
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return max(best, 0.0)
