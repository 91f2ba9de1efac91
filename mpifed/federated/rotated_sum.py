"""Secure aggregation of rotated, quantised updates: the masked sum in few bits.

A sending leader's update part is x_k = n_k H D delta_k (weighted before the rotation, which is
linear), stochastically rounded to `compression_bits` = b bits over [-B, B], where B is the
largest |coordinate| of every sender's x_k, agreed by a MAX over the leaders before any vector
is sent (the one number about the updates the root learns besides their sum). The integers q_k
lie in [0, 2^b - 1], so the sum of K senders' fits in m = b + ceil(log2 K) bits: each leader
masks its integers modulo 2^m with the pairwise masks (`secagg.py`, the low m bits of the same
64-bit keystream, so they cancel modulo 2^m as they do modulo 2^64) and sends them packed, m
bits each. The tail [n_k loss_k, n_k] travels as before, in 64-bit fixed point, masked with the
keystream's words after the update's. The root adds the packed integers modulo 2^m, which is
exact since the true sum is below 2^m, and decodes

    sum_k x_k^ = step sum_k q_k - K B,   sum_k n_k delta_k^ = D H (sum_k x_k^)

an unbiased estimate of the weighted sum (the rounding draws are each leader's own, from the
operating system's entropy, so the root cannot rebuild them). Pure: no MPI here.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import UserError
from ..xp import to_host
from .masked_sum import LOSS_CAP, PreparedRound, tail_fields
from .quantize import dequantize, pack, packed_bytes, quantize, unpack
from .rotated import RotatedCodec, rounding_rng
from .rotation import rotate, rotated_size, unrotate
from .secagg import KeystreamBuffers, add_pairwise_mask, decode, encode_into, scale_bits


def ring_width(bits: int, parties: int) -> int:
    """Return m = bits + ceil(log2 parties): the bits that hold the sum of `parties` integers
    of `bits` bits each without wrapping."""
    return bits + math.ceil(math.log2(max(parties, 1)))


class RotatedMaskedSum:
    """A leader's masked, packed, quantised vector and the root's decoded sum (one per run);
    the counterpart of `masked_sum.MaskedSum` for federated.compression = "rotated".

    Under secure aggregation without DP only (the configuration refuses it with DP)."""

    def __init__(self, fed_cfg, dp, institution: int, codec: RotatedCodec):
        if dp is not None:
            raise ValueError("rotated secure aggregation is not built for DP")
        self.fed_cfg, self.dp, self.institution, self.codec = fed_cfg, dp, institution, codec
        self.buffers = KeystreamBuffers()

    def widths(self, ready: PreparedRound) -> tuple[int, int, int]:
        """Return (rotated update length, tail length, ring bits m) of the round."""
        return (rotated_size(ready.size), len(tail_fields(self.dp)),
                ring_width(self.codec.bits, len(ready.senders)))

    def wire_bytes(self, ready: PreparedRound) -> int:
        """Return the bytes a sending leader sends: m-bit update integers, 64-bit tail words."""
        d, t, m = self.widths(ready)
        return packed_bytes(d, m) + 8 * t

    def draw_mask_and_noise(self, private, ready: PreparedRound) -> None:
        """Fill the buffer "mask" with this leader's pairwise masks: 64-bit words, rotated
        update then tail (no noise: DP is refused)."""
        d, t, _ = self.widths(ready)
        mask = self.buffers.array("mask", np.uint64, d + t)
        mask[:] = 0
        add_pairwise_mask(mask, self.institution, private, ready.publics, ready.rnd,
                          self.buffers)

    def rotated_update(self, params, global_host, report, sampled: bool,
                       ready: PreparedRound) -> tuple[np.ndarray, list[float]]:
        """Return (x = n_k H D delta, float64[d']; the tail [n_k loss, n_k]); zeros and [0, 0]
        when this leader was not sampled. Raises UserError when the update holds NaN or Inf
        (nothing is sent then) or the weight exceeds federated.secure_max_samples."""
        d, t, _ = self.widths(ready)
        if not sampled:
            return np.zeros(d), [0.0] * t
        weight = float(report.samples)
        if weight > self.fed_cfg.secure_max_samples:
            raise UserError(f"secure aggregation: institution {self.institution} has "
                            f"{weight:.0f} samples, above federated.secure_max_samples; raise it")
        delta = to_host(params).astype(np.float64).reshape(-1) - global_host
        if not np.isfinite(np.linalg.norm(delta)):
            raise UserError("federated: this institution's update holds NaN or Inf (local "
                            "training diverged); lower optim.lr. Nothing was sent")
        delta *= weight
        loss = min(report.loss, LOSS_CAP) if np.isfinite(report.loss) else LOSS_CAP
        return rotate(delta, self.codec.signs(ready.rnd, ready.size)), [weight * loss, weight]

    def masked_wire(self, x, tail, bound: float, ready: PreparedRound) -> np.ndarray:
        """Return this leader's wire: its integers q (b bits over [-bound, bound]) plus its mask
        modulo 2^m, packed m bits each, then its masked 64-bit tail words (uint8)."""
        d, t, m = self.widths(ready)
        q = quantize(x, bound, self.codec.bits, rounding_rng(0, ready.rnd, self.institution,
                                                             secret=True))
        mask = self.buffers.array("mask", np.uint64, d + t)
        q += mask[:d]  # wraps modulo 2^64; only the low m bits travel
        q &= np.uint64((1 << m) - 1)
        tail_ring = encode_into(np.array(tail, dtype=np.float64), self._tail_bound(),
                                self._tail_frac(len(ready.senders)), np.empty(t, np.uint64),
                                "clip")
        tail_ring += mask[d:]
        return np.concatenate([pack(q, m), tail_ring.view(np.uint8)])

    def sum_wires(self, wires, ready: PreparedRound) -> tuple[np.ndarray, np.ndarray]:
        """Return (the integers' sum modulo 2^m, uint64[d']; the tail words' sum modulo 2^64)
        of the senders' wires (an iterable of uint8 buffers)."""
        d, t, m = self.widths(ready)
        total, tail = np.zeros(d, dtype=np.uint64), np.zeros(t, dtype=np.uint64)
        split = packed_bytes(d, m)
        for wire in wires:
            total += unpack(wire[:split], m, d)
            tail += wire[split:].view(np.uint64)
        total &= np.uint64((1 << m) - 1)
        return total, tail

    def decode_sum(self, total, tail, bound: float, ready: PreparedRound) -> np.ndarray:
        """Return [sum_k n_k delta_k^ (float64[size]), sum n_k loss_k, sum n_k] from the sums."""
        parties = len(ready.senders)
        y = dequantize(total, bound, self.codec.bits, count=parties)
        delta = unrotate(y, self.codec.signs(ready.rnd, ready.size), ready.size)
        values = decode(tail, self._tail_frac(parties), 64)
        return np.concatenate([delta, values])

    def _tail_bound(self) -> float:
        return float(self.fed_cfg.secure_max_samples) * LOSS_CAP

    def _tail_frac(self, parties: int) -> int:
        return scale_bits(self._tail_bound(), parties, 64)
