"""Institution-level differential privacy: clipping, Gaussian noise, adaptive clipping, and the
accountants (RDP here, PLD through dp-accounting). Pure functions on arrays; no MPI.

DP-FedAvg (McMahan et al. 2018): each institution's update (its model minus the global model) is
clipped to L2 norm `clip`; Gaussian noise of standard deviation noise_multiplier * clip is added
to the sum; the sum is divided by the fixed denominator q * K (every weight is 1, the paper's
bound w_k <= 1), so one institution changes the result by at most clip / (q K).
Adaptive clipping (Andrew et al. 2021): the clip follows the target quantile of the unclipped
norms, estimated from a noised count of institutions whose norm was under the clip; each sends
b - 1/2 (sensitivity 1/2, as Theorem 1's noise split assumes) and the root adds back q K / 2.
Accounting (Mironov 2017; Mironov, Talwar, Zhang 2019): the Poisson-sampled Gaussian mechanism
at dp-accounting's default orders (fractional ones included), composed over rounds, converted
to (epsilon, delta) as dp-accounting does. All noise comes from the OS's CSPRNG through an
AES-256-CTR keystream (`secure_gaussian`), never from a seeded generator.
"""

from __future__ import annotations

import functools
import math
import os

import numpy as np

from ..errors import UserError
from .secagg import KeystreamBuffers, fill_keystream

# dp-accounting's DEFAULT_RDP_ORDERS: 1.1, 1.2, ..., 10.9, 11, ..., 63, 128, 256, 512, 1024.
ORDERS = tuple(1 + x / 10.0 for x in range(1, 100)) + tuple(range(11, 64)) + (128, 256, 512,
                                                                               1024)
ACCOUNTANTS = ("rdp", "pld")
COUNT_SENSITIVITY = 0.5  # each institution sends its under-clip bit minus 1/2


def clip_update(delta: np.ndarray, clip: float) -> tuple[np.ndarray, float]:
    """Return (delta scaled to L2 norm <= clip, its norm before clipping)."""
    norm = float(np.linalg.norm(delta))
    scale = min(1.0, clip / norm) if norm > 0 else 1.0
    return delta * scale, norm


def secure_uniform_bits(count: int, buffers: KeystreamBuffers | None = None) -> np.ndarray:
    """Return `count` uint64 words from AES-256-CTR keyed by 32 bytes of os.urandom.

    buffers: reuse the caller's buffers; the result is then valid until the next call with them.
    """
    buffers = buffers if buffers is not None else KeystreamBuffers()
    out = buffers.bytes_of("uniform", 8 * count)
    fill_keystream(os.urandom(32), out, 8 * count, buffers)
    return np.frombuffer(out, dtype=np.uint64, count=count)


def unit_interval(words: np.ndarray) -> np.ndarray:
    """Turn uint64 words in place into float64 uniforms in (0, 1); return the float64 view.

    The top 52 bits k become (2k + 1) 2^-53 (exact: the mantissa trick gives 1 + k 2^-52, and
    subtracting 1 - 2^-53 lands on a representable value); the low 12 bits are not used.
    """
    np.right_shift(words, 12, out=words)
    np.bitwise_or(words, 0x3FF0000000000000, out=words)
    floats = words.view(np.float64)
    np.subtract(floats, 1.0 - 2.0 ** -53, out=floats)
    return floats


def secure_gaussian(count: int, stddev: float, out: np.ndarray | None = None,
                    buffers: KeystreamBuffers | None = None) -> np.ndarray:
    """Return `count` N(0, stddev^2) float64 values from a cryptographic source (Box-Muller).

    Each pair of values takes two 64-bit words of AES-256-CTR under an os.urandom key: a
    radius word r (the uniform u of its top 52 bits gives sqrt(-2 ln u)) and an angle word (a
    uniform angle in the first quadrant from its top 52 bits). The two lowest bits of r pick
    the signs of the cosine and sine parts: the pair's law is symmetric under both reflections,
    so the four quadrants give the full circle, and sin and cos only ever see (0, pi/2), where
    NumPy's SIMD versions are several times faster than on (0, 2 pi). All passes run in place.
    A seeded PCG64 would let anyone who learns the seed subtract the noise.
    out: float64[count] to write into (else a new array); buffers: reused scratch.
    """
    out = np.empty(count) if out is None else out[:count]
    if stddev <= 0 or count == 0:
        out[:] = 0.0
        return out
    pairs, singles = (count + 1) // 2, count // 2  # cosine parts, sine parts
    words = secure_uniform_bits(2 * pairs, buffers)
    radius_words, angle_words = words[:pairs], words[pairs:]
    angle = unit_interval(angle_words)
    np.multiply(angle, math.pi / 2, out=angle)
    cosines, sines = out[:pairs], out[pairs:]
    np.cos(angle, out=cosines)
    np.sin(angle[:singles], out=sines)
    signs = angle_words  # the angles are spent: their memory holds the sign bits now
    np.bitwise_and(radius_words, 1, out=signs)
    np.left_shift(signs, 63, out=signs)
    np.bitwise_xor(cosines.view(np.uint64), signs, out=cosines.view(np.uint64))
    np.bitwise_and(radius_words[:singles], 2, out=signs[:singles])
    np.left_shift(signs[:singles], 62, out=signs[:singles])
    np.bitwise_xor(sines.view(np.uint64), signs[:singles], out=sines.view(np.uint64))
    radius = unit_interval(radius_words)
    np.log(radius, out=radius)
    np.multiply(radius, -2.0 * stddev * stddev, out=radius)
    np.sqrt(radius, out=radius)  # stddev * sqrt(-2 ln u)
    np.multiply(cosines, radius, out=cosines)
    np.multiply(sines, radius[:singles], out=sines)
    return out


def secure_bernoulli(q: float) -> bool:
    """Return True with probability q, from os.urandom (a participation draw no one can seed)."""
    if q >= 1:
        return True
    return int.from_bytes(os.urandom(7), "big") < q * 2 ** 56


def share_stddev(stddev: float, honest_shares: int) -> float:
    """Return the stddev of one noise share such that any `honest_shares` shares sum to `stddev`.

    With K leaders sending, the root (which knows its own share) and t colluding leaders
    (which pool theirs) leave K - 1 - t shares they cannot subtract: honest_shares = K - 1 - t.
    """
    if honest_shares < 1:
        raise ValueError("no share is left that the root and the colluders do not know")
    return stddev / math.sqrt(honest_shares)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Return the multiplier left for the updates when the clip count also spends privacy.

    Andrew et al. (2021), Theorem 1: z_delta = (z^-2 - (2 sigma_b)^-2)^(-1/2), for a count with
    sensitivity 1/2 (COUNT_SENSITIVITY): its noise multiplier is sigma_b / (1/2) = 2 sigma_b.
    """
    if count_stddev <= 0:
        return noise_multiplier
    rest = noise_multiplier ** -2 - (count_stddev / COUNT_SENSITIVITY) ** -2
    if rest <= 0:
        least = COUNT_SENSITIVITY / noise_multiplier
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


def _log_erfc(x: float) -> float:
    r = math.erfc(x)
    if r > 0:
        return math.log(r)
    return (-math.log(math.pi) / 2 - math.log(x) - x ** 2 - .5 * x ** -2 + .625 * x ** -4
            - 37. / 24. * x ** -6 + 353. / 64. * x ** -8)  # asymptotic, as dp-accounting


def _log_a_int(q: float, z: float, order: int) -> float:
    log_a = -math.inf
    for i in range(order + 1):
        term = (math.lgamma(order + 1) - math.lgamma(i + 1) - math.lgamma(order - i + 1)
                + i * math.log(q) + (order - i) * math.log1p(-q) + (i * i - i) / (2 * z * z))
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, z: float, order: float) -> float:
    """log A at a fractional order (Mironov, Talwar, Zhang 2019, Section 3.3), summed as
    dp-accounting sums it (every term added: an upper bound); inf when it does not converge."""
    log_a0 = log_a1 = last_s0 = last_s1 = -math.inf
    z0 = z ** 2 * math.log(1 / q - 1) + .5
    for i in range(MAX_TERMS):
        j = order - i
        log_coef = math.lgamma(order + 1) - math.lgamma(i + 1) - math.lgamma(j + 1)
        log_t0 = log_coef + i * math.log(q) + j * math.log1p(-q)
        log_t1 = log_coef + j * math.log(q) + i * math.log1p(-q)
        log_e0 = math.log(.5) + _log_erfc((i - z0) / (math.sqrt(2) * z))
        log_e1 = math.log(.5) + _log_erfc((z0 - j) / (math.sqrt(2) * z))
        log_s0 = log_t0 + (i * i - i) / (2 * z ** 2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * z ** 2) + log_e1
        log_a0, log_a1 = _log_add(log_a0, log_s0), _log_add(log_a1, log_s1)
        total = _log_add(log_a0, log_a1)
        if log_s0 < last_s0 and log_s1 < last_s1 and max(log_s0, log_s1) < total - 30:
            return total
        last_s0, last_s1 = log_s0, log_s1
    return math.inf  # not converged: the order is left out, as dp-accounting does


MAX_TERMS = 1000  # dp-accounting's limit on the fractional-order series


@functools.lru_cache(maxsize=4096)
def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: float) -> float:
    """Return the RDP at `order` of one Poisson-sampled Gaussian mechanism.

    q = 1: order / (2 z^2). Otherwise log(A) / (order - 1) with, at integer orders,
    A = sum_i C(order, i) (1-q)^(order-i) q^i exp((i^2 - i) / (2 z^2)), summed in log space,
    and at fractional orders the two-sided series of Mironov, Talwar and Zhang.
    """
    z = noise_multiplier
    if q == 0:
        return 0.0
    if q >= 1.0:
        return order / (2 * z * z)
    if float(order).is_integer():
        return _log_a_int(q, z, int(order)) / (order - 1)
    return _log_a_frac(q, z, order) / (order - 1)


def epsilon(q: float, noise_multiplier: float, rounds: int, delta: float,
            orders=ORDERS) -> float:
    """Return the RDP epsilon after `rounds` compositions at `delta` (minimised over orders)."""
    return rdp_epsilon({(q, noise_multiplier): rounds}, delta, orders)


def rdp_epsilon(events: dict, delta: float, orders=ORDERS) -> float:
    """Return the RDP epsilon at `delta` of the composed events {(q, z): count}.

    Conversion as in Google's dp-accounting (Canonne, Kamath, Steinke 2020):
    eps = rdp + log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1).
    """
    events = {(q, z): n for (q, z), n in events.items() if n > 0 and q > 0}
    if not events:
        return 0.0
    if any(z == 0 for _, z in events):
        return math.inf
    best = math.inf
    for alpha in orders:
        rdp = sum(n * rdp_sampled_gaussian(q, z, alpha) for (q, z), n in events.items())
        if rdp == math.inf:  # an order whose series did not converge
            continue
        if delta ** 2 + math.expm1(-rdp) > 0:
            return 0.0
        eps = rdp + math.log1p(-1 / alpha) - (math.log(delta) + math.log(alpha)) / (alpha - 1)
        best = min(best, eps)
    return max(best, 0.0)


def pld_epsilon(events: dict, delta: float) -> float:
    """Return dp-accounting's PLD epsilon of {(q, z): count} (tighter than RDP by about 10%);
    needs the optional dp-accounting package."""
    events = {(q, z): n for (q, z), n in events.items() if n > 0 and q > 0}
    if not events:
        return 0.0
    if any(z == 0 for _, z in events):
        return math.inf
    try:
        from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
        from dp_accounting.pld import PLDAccountant
    except ImportError:
        raise UserError("federated.dp.accountant = \"pld\" needs the optional package "
                        "dp-accounting (pip install dp-accounting), or set "
                        "federated.dp.accountant = \"rdp\"") from None
    accountant = PLDAccountant()
    for (q, z), n in events.items():
        event = GaussianDpEvent(z) if q >= 1 else PoissonSampledDpEvent(q, GaussianDpEvent(z))
        accountant.compose(event, n)
    return float(accountant.get_epsilon(delta))


def account(accountant: str, events: dict, delta: float) -> float:
    """Return the epsilon of {(q, z): count} from the chosen accountant ("rdp" or "pld")."""
    if accountant == "pld":
        return pld_epsilon(events, delta)
    return rdp_epsilon(events, delta)
