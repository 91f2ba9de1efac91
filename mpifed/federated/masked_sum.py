"""The leaders' vectors of a private round and the arithmetic on them: the layout, the noise
shares, the fixed-point encoding with pairwise masks, and the decoding of the root's sum.

A sending leader's vector is [w * delta (+ its noise share), tail]: without DP, w = n_k and the
tail is [w * loss, w]; under DP, w = 1, delta is clipped and the tail is [b - 1/2] with adaptive
clipping (b: the under-clip bit), else empty. Under secure aggregation it is encoded in a ring of
federated.secure_bits and masked; the masks cancel in the root's sum modulo 2^bits. Pure: no MPI,
the buffers (keystreams, masks, noise, rings) are reused from round to round.

Nothing here tells another institution about this one's data: under DP an update holding NaN or
Inf counts as a zero update over the clip (logged here only), and a vector outside the ring's
range is refused with a generic code (`RANGE_CODE`), its detail logged on this rank alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..log import get_logger
from ..xp import to_host
from .dp import COUNT_SENSITIVITY, clip_update, secure_gaussian, share_stddev, update_noise_multiplier
from .secagg import UINT, KeystreamBuffers, add_pairwise_mask, decode, encode_into, scale_bits

LOSS_CAP = 1e4  # losses are metrics: capped so that their fixed-point range is known
NOISE_SIGMAS = 8  # the ring's range covers a leader's noise share to 8 standard deviations
RANGE_CODE = 20  # a refusal for a vector outside the range (transcript.ANONYMOUS)
log = get_logger(__name__)


def tail_fields(dp) -> tuple[str, ...]:
    """Return the names of the values after the update in a leader's vector."""
    if dp is None:
        return ("loss", "weight")
    return ("under_clip",) if dp.adaptive else ()


def honest_shares(fed_cfg, dp, senders: int) -> int:
    """Return how many noise shares neither the root nor the colluders know: K - 1 - t."""
    return senders - 1 - dp.colluders


def leader_vector(params, global_host, report, weight: float, dp,
                  clip: float) -> np.ndarray:
    """Return this leader's float vector [w*delta, tail] before noise and encoding.

    Without DP, raises UserError when the update holds NaN or Inf (nothing is sent then); under
    DP such an update is a zero one, counted over the clip (`zero_if_not_finite`).
    """
    delta, finite = to_host(params).astype(np.float64) - global_host, True
    if dp is not None:
        delta, finite = zero_if_not_finite(delta)
    if not np.all(np.isfinite(delta)):
        raise UserError("federated: this institution's update holds NaN or Inf (local training "
                        "diverged); lower optim.lr. Nothing was sent")
    if dp is None:
        loss = min(report.loss, LOSS_CAP) if np.isfinite(report.loss) else LOSS_CAP
        return np.concatenate([weight * delta, [weight * loss, weight]])
    delta, norm = clip_update(delta, clip)
    under = finite and norm <= clip
    tail = [(1.0 if under else 0.0) - COUNT_SENSITIVITY] if dp.adaptive else []
    return np.concatenate([delta, tail])


def zero_if_not_finite(delta: np.ndarray) -> tuple[np.ndarray, bool]:
    """Return (delta, True), or (zeros in delta's place, False) when it holds NaN or Inf.

    Under DP a diverged institution contributes a zero update that counts as over the clip,
    so neither an abort nor a different message tells the others (or the root) about it; the
    institution's own log says so.
    """
    if np.isfinite(np.linalg.norm(delta)) or np.all(np.isfinite(delta)):
        return delta, True
    log.warning("federated: this institution's update holds NaN or Inf (local training "
                "diverged); it contributes a zero update this round, counted as over the "
                "clip. Lower optim.lr")
    delta[...] = 0.0
    return delta, False


def noise_stddevs(dp, clip: float) -> tuple[float, float]:
    """Return the full (stddev on the update sum, stddev on the clip count) of a round."""
    if dp is None:
        return 0.0, 0.0
    count_std = dp.clip_count_stddev if dp.adaptive else 0.0
    z_update = update_noise_multiplier(dp.noise_multiplier, count_std)
    return z_update * clip, count_std


def ring_scales(fed_cfg, dp, parties: int, clip: float = 0.0) -> tuple[float, int, int]:
    """Return (update range, fraction bits of the update part, of the tail) for the ring.

    The update range is `update_range` (the declared federated.secure_range times the largest
    weight; under DP at least the clip) plus, under DP, NOISE_SIGMAS standard deviations of a
    leader's noise share (public numbers).
    """
    bits = fed_cfg.secure_bits
    w_max = 1.0 if dp else float(fed_cfg.secure_max_samples)
    update_std, _ = noise_stddevs(dp, clip)
    share = share_stddev(update_std, honest_shares(fed_cfg, dp, parties)) if dp else 0.0
    bound = update_range(fed_cfg, dp, clip) + NOISE_SIGMAS * share
    return bound, scale_bits(bound, parties, bits), scale_bits(w_max * LOSS_CAP, parties, bits)


def update_range(fed_cfg, dp, clip: float) -> float:
    """Return the largest |coordinate| of a leader's update before noise: secure_range times the
    largest weight, and under DP at least the clip (a clipped update's coordinates are <= C)."""
    if dp is None:
        return float(fed_cfg.secure_max_samples) * fed_cfg.secure_range
    return max(fed_cfg.secure_range, clip)


def ring_dtype(bits: int):
    return np.uint64 if bits == 64 else np.uint32


def split_sums(total, size: int, received: int, dp) -> dict:
    """Return a summed vector as {"delta_sum", one key per tail field, "bytes": received}."""
    sums = {"delta_sum": total[:size], "bytes": received}
    for i, name in enumerate(tail_fields(dp)):
        sums[name] = float(total[size + i])
    return sums


@dataclass
class PreparedRound:
    """What a round's model-independent half leaves for its second half (that round only)."""

    rnd: int
    senders: list[int]
    clip: float  # the relayed clip under DP, else 0
    size: int  # the update's length
    publics: dict[int, bytes] = field(default_factory=dict)  # a sending leader's peers (SA)


class MaskedSum:
    """A leader's masked fixed-point vector and the root's decoded sum, in buffers reused
    across rounds (one per run). institution: this rank's institution (its masks' index)."""

    def __init__(self, fed_cfg, dp, institution: int):
        self.fed_cfg, self.dp, self.institution = fed_cfg, dp, institution
        self.buffers = KeystreamBuffers()

    def draw_mask_and_noise(self, private, ready: PreparedRound) -> None:
        """Fill the buffers "mask" (this leader's pairwise masks, ring elements) and "vector"
        (its noise share under DP, else zeros), both [update, tail] wide."""
        fed_cfg, dp, width = self.fed_cfg, self.dp, ready.size + len(tail_fields(self.dp))
        mask = self.buffers.array("mask", UINT[fed_cfg.secure_bits], width)
        mask[:] = 0
        add_pairwise_mask(mask, self.institution, private, ready.publics, ready.rnd,
                          self.buffers)
        vector = self.buffers.array("vector", np.float64, width)
        if dp is None:
            vector[:] = 0.0
            return
        honest = honest_shares(fed_cfg, dp, len(ready.publics))
        update_std, count_std = noise_stddevs(dp, ready.clip)
        size = ready.size
        secure_gaussian(size, share_stddev(update_std, honest), vector[:size], self.buffers)
        count_share = share_stddev(count_std, honest) if count_std else 0.0
        secure_gaussian(width - size, count_share, vector[size:], self.buffers)

    def add_update(self, vector, params, global_host, report, ready: PreparedRound) -> list:
        """Add w * delta (clipped under DP) to vector[:size] in place; return the tail's values.

        The same values as `leader_vector`, without its temporaries. With
        secure_out_of_range = "clip" the update's coordinates are clipped to `update_range`
        here, before the noise share is added, so the noise is never cut. Without DP, raises
        UserError when the update holds NaN or Inf (nothing is sent then); under DP such an
        update is a zero one, counted over the clip.
        """
        dp, size = self.dp, ready.size
        delta = self.buffers.array("delta", np.float64, size)
        np.subtract(to_host(params).reshape(-1), global_host, out=delta)
        norm = float(np.linalg.norm(delta))  # NaN or Inf anywhere makes it so
        finite = True
        if dp is not None and not np.isfinite(norm):
            delta, finite = zero_if_not_finite(delta)
            norm = float(np.linalg.norm(delta))
        if not np.isfinite(norm) and not np.all(np.isfinite(delta)):
            raise UserError("federated: this institution's update holds NaN or Inf (local "
                            "training diverged); lower optim.lr. Nothing was sent")
        if dp is None:
            weight = report.samples
            np.multiply(delta, weight, out=delta)
            self._clip_to_range(delta, ready.clip)
            np.add(vector[:size], delta, out=vector[:size])
            loss = min(report.loss, LOSS_CAP) if np.isfinite(report.loss) else LOSS_CAP
            return [weight * loss, weight]
        clip = ready.clip
        if norm > clip:  # clip_update's scaling
            np.multiply(delta, clip / norm, out=delta)
        self._clip_to_range(delta, clip)
        np.add(vector[:size], delta, out=vector[:size])
        under = finite and norm <= clip
        return [(1.0 if under else 0.0) - COUNT_SENSITIVITY] if dp.adaptive else []

    def _clip_to_range(self, delta, clip: float) -> None:
        """With secure_out_of_range = "clip", clip the (weighted) update to its range in place,
        logging how many coordinates moved on this rank only."""
        if self.fed_cfg.secure_out_of_range != "clip":
            return
        bound = update_range(self.fed_cfg, self.dp, clip)
        over = int(np.count_nonzero(np.abs(delta) > bound))
        if over:
            log.warning("secure aggregation: %d coordinates of this institution's update were "
                        "clipped to the declared range", over)
            np.clip(delta, -bound, bound, out=delta)

    def masked_ring(self, params, global_host, report, sampled, ready: PreparedRound
                    ) -> tuple[np.ndarray | None, int]:
        """Return (a leader's [update + noise share, tail] in fixed point, masked; 0), or
        (None, RANGE_CODE) when the vector lies outside the ring's range (the detail goes to
        this rank's log alone: the code crosses institutions, never a value).

        The noise share and the masks wait in the buffers since `draw_mask_and_noise`; the
        result is the buffer "ring", valid until the next round. The update part is encoded
        without clipping: with secure_out_of_range = "clip" the update was clipped before its
        noise was added (`add_update`), so only a noise share beyond NOISE_SIGMAS standard
        deviations can leave the range, and that refuses the round rather than cut the noise.
        """
        fed_cfg, dp, me, size = self.fed_cfg, self.dp, self.institution, ready.size
        bits = fed_cfg.secure_bits
        w_max = 1.0 if dp else float(fed_cfg.secure_max_samples)
        bound, f_delta, f_tail = ring_scales(fed_cfg, dp, len(ready.publics), ready.clip)
        if dp is None and sampled and report.samples > w_max:
            raise UserError(f"secure aggregation: institution {me} has {report.samples:.0f} "
                            "samples, above federated.secure_max_samples; raise it")
        vector = self.buffers.array("vector", np.float64, size + len(tail_fields(dp)))
        if sampled:
            vector[size:] += self.add_update(vector, params, global_host, report, ready)
        ring = self.buffers.array("ring", UINT[bits], vector.size)
        try:
            encode_into(vector[:size], bound, f_delta, ring[:size], "error")
        except UserError as err:
            log.warning("secure aggregation: this institution's vector is outside the declared "
                        "range; the round is refused (raise federated.secure_range or set "
                        "federated.secure_out_of_range = \"clip\")")
            log.debug("secure aggregation: %s", err)
            return None, RANGE_CODE
        encode_into(vector[size:], w_max * LOSS_CAP, f_tail, ring[size:], "clip")
        return np.add(ring, self.buffers.array("mask", UINT[bits], vector.size), out=ring), 0

    def sum_buffers(self, ring, size: int) -> tuple[np.ndarray, np.ndarray]:
        """Return the root's (running sum, starting at its own masked vector or zeros; a
        buffer to receive another leader's into), both reused."""
        bits, width = self.fed_cfg.secure_bits, size + len(tail_fields(self.dp))
        total = self.buffers.array("total", ring_dtype(bits), width)
        total[:] = ring if ring is not None else 0
        return total, self.buffers.array("received", ring_dtype(bits), width)

    def decode_sum(self, total, senders: int, ready: PreparedRound) -> np.ndarray:
        """Return the summed ring `total` of `senders` vectors as floats (a new array)."""
        bits, size = self.fed_cfg.secure_bits, ready.size
        _, f_delta, f_tail = ring_scales(self.fed_cfg, self.dp, max(senders, 1), ready.clip)
        values = np.empty(total.size)  # handed to the caller: not a reused buffer
        decode(total[:size], f_delta, bits, values[:size])
        decode(total[size:], f_tail, bits, values[size:])
        return values
