"""The leaders' vectors of a private round and the arithmetic on them: the layout, the noise
shares, the fixed-point encoding with pairwise masks, and the decoding of the root's sum.

A sending leader's vector is [w * delta (+ its noise share), tail]: without DP, w = n_k and the
tail is [w * loss, w]; under DP, w = 1, delta is clipped and the tail is [b - 1/2] with adaptive
clipping (b: the under-clip bit), else empty. Under secure aggregation it is encoded in a ring of
federated.secure_bits and masked; the masks cancel in the root's sum modulo 2^bits. Pure: no MPI,
the buffers (keystreams, masks, noise, rings) are reused from round to round.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import UserError
from ..xp import to_host
from .dp import COUNT_SENSITIVITY, clip_update, secure_gaussian, share_stddev, update_noise_multiplier
from .secagg import UINT, KeystreamBuffers, add_pairwise_mask, decode, encode_into, scale_bits

LOSS_CAP = 1e4  # losses are metrics: capped so that their fixed-point range is known
NOISE_SIGMAS = 8  # the ring's range covers a leader's noise share to 8 standard deviations


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

    Raises UserError when the update holds NaN or Inf (nothing is sent then).
    """
    delta = to_host(params).astype(np.float64) - global_host
    if not np.all(np.isfinite(delta)):
        raise UserError("federated: this institution's update holds NaN or Inf (local training "
                        "diverged); lower optim.lr. Nothing was sent")
    if dp is None:
        loss = min(report.loss, LOSS_CAP) if np.isfinite(report.loss) else LOSS_CAP
        return np.concatenate([weight * delta, [weight * loss, weight]])
    delta, norm = clip_update(delta, clip)
    tail = [(1.0 if norm <= clip else 0.0) - COUNT_SENSITIVITY] if dp.adaptive else []
    return np.concatenate([delta, tail])


def noise_stddevs(dp, clip: float) -> tuple[float, float]:
    """Return the full (stddev on the update sum, stddev on the clip count) of a round."""
    if dp is None:
        return 0.0, 0.0
    count_std = dp.clip_count_stddev if dp.adaptive else 0.0
    z_update = update_noise_multiplier(dp.noise_multiplier, count_std)
    return z_update * clip, count_std


def ring_scales(fed_cfg, dp, parties: int, clip: float = 0.0) -> tuple[float, int, int]:
    """Return (update range, fraction bits of the update part, of the tail) for the ring.

    The update range is the declared federated.secure_range times the largest weight, plus,
    under DP, NOISE_SIGMAS standard deviations of a leader's noise share (public numbers).
    """
    bits = fed_cfg.secure_bits
    w_max = 1.0 if dp else float(fed_cfg.secure_max_samples)
    update_std, _ = noise_stddevs(dp, clip)
    share = share_stddev(update_std, honest_shares(fed_cfg, dp, parties)) if dp else 0.0
    bound = w_max * fed_cfg.secure_range + NOISE_SIGMAS * share
    return bound, scale_bits(bound, parties, bits), scale_bits(w_max * LOSS_CAP, parties, bits)


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

        The same values as `leader_vector`, without its temporaries. Raises UserError when the
        update holds NaN or Inf (nothing is sent then).
        """
        dp, size = self.dp, ready.size
        delta = self.buffers.array("delta", np.float64, size)
        np.subtract(to_host(params).reshape(-1), global_host, out=delta)
        norm = float(np.linalg.norm(delta))  # NaN or Inf anywhere makes it so
        if not np.isfinite(norm) and not np.all(np.isfinite(delta)):
            raise UserError("federated: this institution's update holds NaN or Inf (local "
                            "training diverged); lower optim.lr. Nothing was sent")
        if dp is None:
            weight = report.samples
            np.multiply(delta, weight, out=delta)
            np.add(vector[:size], delta, out=vector[:size])
            loss = min(report.loss, LOSS_CAP) if np.isfinite(report.loss) else LOSS_CAP
            return [weight * loss, weight]
        clip = ready.clip
        if norm > clip:  # clip_update's scaling
            np.multiply(delta, clip / norm, out=delta)
        np.add(vector[:size], delta, out=vector[:size])
        return [(1.0 if norm <= clip else 0.0) - COUNT_SENSITIVITY] if dp.adaptive else []

    def masked_ring(self, params, global_host, report, sampled, ready: PreparedRound):
        """Return a leader's [update + noise share, tail] in fixed point, masked (or raise).

        The noise share and the masks wait in the buffers since `draw_mask_and_noise`; the
        result is the buffer "ring", valid until the next round.
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
        encode_into(vector[:size], bound, f_delta, ring[:size], fed_cfg.secure_out_of_range)
        encode_into(vector[size:], w_max * LOSS_CAP, f_tail, ring[size:], "clip")
        return np.add(ring, self.buffers.array("mask", UINT[bits], vector.size), out=ring)

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
