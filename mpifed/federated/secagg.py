"""Secure aggregation among institution leaders: pairwise additive masks (Bonawitz et al. 2017).

Each round every participating leader makes a fresh X25519 key pair; the root only relays the
public keys. Each pair (i, j) derives a shared secret by Diffie-Hellman and, through HKDF-SHA256,
a ChaCha20 key whose keystream is the pair's mask: i adds it and j subtracts it, so the masks
cancel in the sum and the root learns only the sum of what the leaders encoded. Values travel in
fixed point in the integer ring modulo 2^bits. No dropout recovery (no Shamir shares): a leader
that fails ends the run, as every failure does in mpifed.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import UserError

UINT = {32: np.uint32, 64: np.uint64}
SINT = {32: np.int32, 64: np.int64}


def new_keypair() -> tuple[X25519PrivateKey, bytes]:
    """Return a fresh private key and its 32-byte public key."""
    private = X25519PrivateKey.generate()
    public = private.public_key().public_bytes(serialization.Encoding.Raw,
                                               serialization.PublicFormat.Raw)
    return private, public


def check_distinct(publics: dict[int, bytes]) -> None:
    """Refuse a round in which two institutions present the same public key (a reused key)."""
    seen: dict[bytes, int] = {}
    for institution, key in sorted(publics.items()):
        if key in seen:
            raise UserError(f"secure aggregation: institution {institution} presented the same "
                            f"public key as institution {seen[key]}; every leader must make a "
                            "fresh key pair each round, so the round is refused")
        seen[key] = institution


def pair_key(private: X25519PrivateKey, peer_public: bytes, round_index: int, low: int,
             high: int) -> bytes:
    """Return the 32-byte mask key that institutions `low` < `high` share in a round."""
    secret = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=f"mpifed-secagg-{round_index}".encode(),
                info=f"mask {low} {high}".encode())
    return hkdf.derive(secret)


def keystream(key: bytes, count: int, bits: int) -> np.ndarray:
    """Return `count` pseudo-random ring elements: ChaCha20's keystream under `key`."""
    nbytes = count * bits // 8
    # The key is fresh for every pair and round, so one fixed nonce never repeats under a key.
    encryptor = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    return np.frombuffer(encryptor.update(bytes(nbytes)), dtype=UINT[bits])


def pairwise_mask(me: int, private: X25519PrivateKey, publics: dict[int, bytes],
                  round_index: int, count: int, bits: int) -> np.ndarray:
    """Return this institution's total mask: + stream for each higher peer, - for each lower."""
    total = np.zeros(count, dtype=UINT[bits])
    for peer, public in publics.items():
        if peer == me:
            continue
        low, high = min(me, peer), max(me, peer)
        stream = keystream(pair_key(private, public, round_index, low, high), count, bits)
        if me == low:
            total += stream  # unsigned: wraps modulo 2^bits
        else:
            total -= stream
    return total


def scale_bits(bound: float, parties: int, bits: int) -> int:
    """Return the fraction bits f that fit `parties` values of magnitude <= `bound` in the ring.

    The sum must stay below 2^(bits-2) in magnitude: parties * bound * 2^f < 2^(bits-2).
    """
    room = bits - 2 - math.log2(max(parties, 1) * max(bound, 1e-300))
    f = math.floor(room)
    if f < 8:
        raise UserError(f"secure aggregation: a {bits}-bit ring cannot hold {parties} values of "
                        f"magnitude {bound:g} with useful precision; use "
                        "federated.secure_bits = 64, a smaller federated.secure_range, or a "
                        "smaller federated.secure_max_samples")
    return min(f, bits - 11)


def encode(values: np.ndarray, bound: float, frac_bits: int, bits: int,
           out_of_range: str = "error") -> np.ndarray:
    """Return `values` in fixed point with `frac_bits` fraction bits, as ring elements.

    Values beyond +-bound are an error, or clipped with a warning when out_of_range = "clip":
    never a silent wrap-around.
    """
    over = np.abs(values) > bound
    if over.any():
        worst = float(np.abs(values).max())
        if out_of_range != "clip":
            raise UserError(f"secure aggregation: a value of magnitude {worst:g} is outside the "
                            f"declared range +-{bound:g}; raise federated.secure_range or set "
                            "federated.secure_out_of_range = \"clip\"")
        warnings.warn(f"secure aggregation: {int(over.sum())} values beyond +-{bound:g} "
                      f"(largest {worst:g}) were clipped", stacklevel=2)
        values = np.clip(values, -bound, bound)
    scaled = np.rint(values * 2.0 ** frac_bits).astype(SINT[bits])
    return scaled.view(UINT[bits])


def decode(total: np.ndarray, frac_bits: int, bits: int) -> np.ndarray:
    """Return the real values of a ring sum (two's complement, then / 2^frac_bits)."""
    return total.view(SINT[bits]).astype(np.float64) / 2.0 ** frac_bits
