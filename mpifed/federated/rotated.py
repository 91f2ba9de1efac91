"""federated.compression = "rotated": an institution's update in `compression_bits` bits a
coordinate, after a shared-seed random rotation (`rotation.py`) and stochastic quantisation
(`quantize.py`).

A leader rotates its update delta (float64[d]) with the round's public signs, y = H D delta,
quantises y over [-B, B] with B = max|y| (its own range: the root decodes each institution's
vector alone) and sends

    [B: float64][tail: float64 x t][q: d' integers of `bits` bits, packed]   (d' = rotated_size(d))

The root de-quantises and rotates back, delta^ = D H (q step - B), an unbiased estimate of
delta with ||delta^ - delta|| < step sqrt(d') (the rotation keeps norms). Since every step is
linear, a weighted mean of the delta^ is an unbiased estimate of the weighted mean of the deltas.
The model the root broadcasts back stays in full precision: only the institutions' updates are
compressed.

    >>> codec = RotatedCodec(bits=8, seed=5)
    >>> wire = codec.encode(delta, round_index=0, rng=rounding_rng(5, 0, 2))  # uint8
    >>> delta_hat, tail = codec.decode(wire, round_index=0, size=delta.size)
"""

from __future__ import annotations

import numpy as np

from .dp import secure_uniform_bits, unit_interval
from .quantize import dequantize, pack, packed_bytes, quantize, unpack
from .rotation import rotate, rotated_size, rotation_signs, unrotate

UPDATE_COMPRESSIONS = ("none", "rotated")  # federated.compression
ROUNDING_TAG = 0x71756E74  # "qunt": the rounding draws' stream, apart from the rotation's


class SecureUniform:
    """Uniform draws in (0, 1) from AES-256-CTR keyed by os.urandom (`dp.secure_uniform_bits`),
    as the private path's noise: no seeded generator, nothing anyone else can rebuild."""

    def random(self, size: int) -> np.ndarray:
        return unit_interval(secure_uniform_bits(size))


def rounding_rng(seed: int, round_index: int, institution: int, secret: bool = False):
    """Return the source of one institution's rounding draws in a round (its `.random(n)`).

    Seeded by (run.seed, round, institution) in a plain run, so a run and its resume are
    reproducible bit for bit; no other institution draws from it. secret (under DP or secure
    aggregation): `SecureUniform`, so not even the root can rebuild an institution's rounding.
    """
    if secret:
        return SecureUniform()
    return np.random.default_rng([seed, round_index, institution, ROUNDING_TAG])


class RotatedCodec:
    """Encodes and decodes an institution's update (one per run; the round's signs cached).

    bits: federated.compression_bits; seed: run.seed, which every institution shares."""

    def __init__(self, bits: int, seed: int):
        self.bits, self.seed = bits, seed
        self._signs: tuple[int, int, np.ndarray] | None = None

    def signs(self, round_index: int, size: int) -> np.ndarray:
        """Return round `round_index`'s rotation signs for a `size`-long update (cached)."""
        if self._signs is None or self._signs[:2] != (round_index, size):
            self._signs = (round_index, size, rotation_signs(self.seed, round_index, size))
        return self._signs[2]

    def wire_bytes(self, size: int, tail: int = 0) -> int:
        """Return the bytes of one encoded update of `size` values and `tail` float64s."""
        return 8 * (1 + tail) + packed_bytes(rotated_size(size), self.bits)

    def encode(self, delta, round_index: int, rng, tail=()) -> np.ndarray:
        """Return delta (float64[size]) and the float64s `tail` as one uint8 wire buffer."""
        y = rotate(np.asarray(delta, dtype=np.float64), self.signs(round_index, delta.size))
        bound = float(np.abs(y).max()) if y.size else 0.0
        q = quantize(y, bound, self.bits, rng)
        head = np.array([bound, *tail], dtype=np.float64).view(np.uint8)
        return np.concatenate([head, pack(q, self.bits)])

    def decode(self, wire, round_index: int, size: int, tail: int = 0
               ) -> tuple[np.ndarray, np.ndarray]:
        """Return (delta^: float64[size], tail: float64[tail]) from `encode`'s buffer."""
        wire = np.asarray(wire, dtype=np.uint8)
        head = wire[:8 * (1 + tail)].view(np.float64)
        q = unpack(wire[8 * (1 + tail):], self.bits, rotated_size(size))
        y = dequantize(q, float(head[0]), self.bits)
        return unrotate(y, self.signs(round_index, size), size), head[1:].copy()


def make_codec(fed_cfg, seed: int) -> RotatedCodec | None:
    """Return the codec federated.compression names (None: "none", updates sent as they are)."""
    if fed_cfg.compression == "rotated":
        return RotatedCodec(fed_cfg.compression_bits, seed)
    return None
