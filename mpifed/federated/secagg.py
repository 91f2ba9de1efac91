"""Secure aggregation among institution leaders: pairwise additive masks (Bonawitz et al. 2017).

Each round every participating leader makes a fresh X25519 key pair; the root only relays the
public keys. Each pair (i, j) derives a shared secret by Diffie-Hellman and, through HKDF-SHA256,
an AES-256 key whose CTR keystream is the pair's mask: i adds it and j subtracts it, so the masks
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
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import UserError

UINT = {32: np.uint32, 64: np.uint64}
SINT = {32: np.int32, 64: np.int64}
# federated.secure_out_of_range: what `encode` does with a value beyond the range.
OUT_OF_RANGE_MODES = ("error", "clip")


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


class KeystreamBuffers:
    """The buffers that keystreams, masks and noise reuse round after round, owned by the caller
    (one set per aggregator): the zeros every keystream encrypts and named scratch buffers.

    Reuse is the point: on a VM, the page faults of a fresh 4 MB buffer cost more than the
    AES-NI keystream that fills it.
    """

    def __init__(self):
        self.zeros = b""
        self.named: dict[str, bytearray] = {}

    def zeros_of(self, nbytes: int) -> memoryview:
        if len(self.zeros) < nbytes:
            self.zeros = bytes(nbytes)
        return memoryview(self.zeros)[:nbytes]

    def bytes_of(self, name: str, nbytes: int) -> bytearray:
        """Return the buffer `name`, at least nbytes + 15 long (update_into wants room for one
        block more); its content is whatever its last user left."""
        buf = self.named.get(name)
        if buf is None or len(buf) < nbytes + 15:
            buf = self.named[name] = bytearray(nbytes + 16)
        return buf

    def array(self, name: str, dtype, count: int) -> np.ndarray:
        """Return the buffer `name` as `count` elements of `dtype` (a writable view)."""
        dtype = np.dtype(dtype)
        return np.frombuffer(self.bytes_of(name, count * dtype.itemsize), dtype=dtype,
                             count=count)

    def scratch_of(self, nbytes: int) -> bytearray:
        return self.bytes_of("scratch", nbytes)


def fill_keystream(key: bytes, out: bytearray, nbytes: int, buffers: KeystreamBuffers) -> None:
    """Write `nbytes` of AES-256-CTR keystream under `key` to the start of `out` (which holds
    at least nbytes + 15 bytes)."""
    encryptor = Cipher(algorithms.AES(key), modes.CTR(b"\0" * 16)).encryptor()
    encryptor.update_into(buffers.zeros_of(nbytes), out)


def keystream(key: bytes, count: int, bits: int, buffers: KeystreamBuffers | None = None
              ) -> np.ndarray:
    """Return `count` pseudo-random ring elements: AES-256-CTR's keystream under `key`.

    AES-CTR (a cryptographic stream, with AES-NI several GB/s here) rather than a seeded NumPy
    generator, whose 32 to 128-bit seeds are no secret (Flower's issue #7522). The key is fresh
    for every pair and round, so the one fixed counter block never repeats under a key.
    buffers: reuse the caller's buffers; the result is then valid until the next call with them.
    """
    nbytes = count * bits // 8
    buffers = buffers if buffers is not None else KeystreamBuffers()
    out = buffers.scratch_of(nbytes)
    fill_keystream(key, out, nbytes, buffers)
    return np.frombuffer(out, dtype=UINT[bits], count=count)


def add_pairwise_mask(ring: np.ndarray, me: int, private: X25519PrivateKey,
                      publics: dict[int, bytes], round_index: int,
                      buffers: KeystreamBuffers | None = None) -> np.ndarray:
    """Add this institution's mask to `ring` in place (+ stream for each higher peer, - for each
    lower); return it. Unsigned arithmetic wraps modulo 2^bits, as the ring wants."""
    bits = ring.dtype.itemsize * 8
    buffers = buffers if buffers is not None else KeystreamBuffers()
    for peer, public in publics.items():
        if peer == me:
            continue
        low, high = min(me, peer), max(me, peer)
        key = pair_key(private, public, round_index, low, high)
        stream = keystream(key, ring.size, bits, buffers)
        if me == low:
            np.add(ring, stream, out=ring)
        else:
            np.subtract(ring, stream, out=ring)
    return ring


def pairwise_mask(me: int, private: X25519PrivateKey, publics: dict[int, bytes],
                  round_index: int, count: int, bits: int) -> np.ndarray:
    """Return this institution's total mask on its own (for tests and inspection)."""
    return add_pairwise_mask(np.zeros(count, dtype=UINT[bits]), me, private, publics,
                             round_index)


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
    never a silent wrap-around. NaN or Inf is an error (it would encode as -2^(bits-1)).
    """
    ring = np.empty(values.size, dtype=UINT[bits])
    return encode_into(np.array(values, dtype=np.float64), bound, frac_bits, ring, out_of_range)


def encode_into(values: np.ndarray, bound: float, frac_bits: int, out: np.ndarray,
                out_of_range: str = "error") -> np.ndarray:
    """`encode` into the ring elements `out` (uint32 or uint64, values.size of them); return it.

    values (float64) is consumed: it is scaled and rounded in place. Two reductions (max, min)
    check the range and finiteness at once; the slow count runs only when one fails.
    """
    if values.size:
        high, low = float(values.max()), float(values.min())
        if not (np.isfinite(high) and np.isfinite(low)):
            bad = int(np.count_nonzero(~np.isfinite(values)))
            raise UserError(f"secure aggregation: {bad} values of the update are NaN or Inf; "
                            "the local training diverged (lower optim.lr) and nothing was sent")
        if max(high, -low) > bound:
            _clip_or_refuse(values, bound, out_of_range)
    np.multiply(values, 2.0 ** frac_bits, out=values)
    np.rint(values, out=values)
    np.copyto(out.view(SINT[out.dtype.itemsize * 8]), values, casting="unsafe")
    return out


def _clip_or_refuse(values: np.ndarray, bound: float, out_of_range: str) -> None:
    """Clip `values` in place to +-bound with a warning, or raise (out_of_range = "error")."""
    worst = float(np.abs(values).max())
    if out_of_range != "clip":
        raise UserError(f"secure aggregation: a value of magnitude {worst:g} is outside the "
                        f"declared range +-{bound:g}; raise federated.secure_range or set "
                        "federated.secure_out_of_range = \"clip\"")
    over = int(np.count_nonzero(np.abs(values) > bound))
    warnings.warn(f"secure aggregation: {over} values beyond +-{bound:g} "
                  f"(largest {worst:g}) were clipped", stacklevel=3)
    np.clip(values, -bound, bound, out=values)


def decode(total: np.ndarray, frac_bits: int, bits: int, out: np.ndarray | None = None
           ) -> np.ndarray:
    """Return the real values of a ring sum (two's complement, then / 2^frac_bits).

    out: float64[total.size] to write into (else a new array).
    """
    out = np.empty(total.size) if out is None else out
    return np.multiply(total.view(SINT[bits]), 2.0 ** -frac_bits, out=out)
