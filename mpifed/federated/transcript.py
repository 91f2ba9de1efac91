"""The signed transcript of a round's key exchange: what the messages hold, what a leader checks.

A sending leader's entry in the key table is [present flag, X25519 public key, its Ed25519
signature over `key_message`]. With identities, every sender then signs `list_message` over the
whole table it received (Bonawitz et al.'s consistency round), so a root that relays different
lists to different leaders is caught. Pure: the tables are numpy arrays, nothing here sends.
"""

from __future__ import annotations

import hashlib
import struct

import numpy as np

from .identity import SIGNATURE_BYTES, Identity

PUBLIC_BYTES = 32
ENTRY = 1 + PUBLIC_BYTES + SIGNATURE_BYTES  # present flag, X25519 key, its signature

# What an honest leader checks, by refusal code (the codes travel; each rank writes the text).
CHECKS = {
    1: "the clip relayed by the root is not finite and positive",
    2: "a relayed key's signature does not verify (a substituted key)",
    3: "a participant's key is missing from the relayed list",
    4: "the relayed list holds a key of an institution that does not take part",
    5: "its own key came back altered",
    6: "two institutions present the same public key (a reused key)",
    7: "a list signature does not verify (the root sent different lists to different leaders)",
}


def key_message(round_index: int, institution: int, public: bytes) -> bytes:
    """Return what an institution signs for its round key."""
    return b"mpifed-secagg-key" + struct.pack("<qq", round_index, institution) + public


def list_message(round_index: int, institution: int, table: np.ndarray) -> bytes:
    """Return what an institution signs to confirm the key table it received."""
    digest = hashlib.sha256(np.ascontiguousarray(table).tobytes()).digest()
    return b"mpifed-secagg-list" + struct.pack("<qq", round_index, institution) + digest


def check_keys(table, senders, rnd, public, me: int,
               identity: Identity | None) -> tuple[int, int]:
    """Return (refusal code, culprit) for a relayed key list; (0, me) when it holds."""
    present = set(np.flatnonzero(table[:, 0]).tolist())
    for k in senders:
        if k not in present:
            return 3, k
    for k in sorted(present - set(senders)):
        return 4, k
    if table[me, 1:1 + PUBLIC_BYTES].tobytes() != public:
        return 5, me
    if identity is not None:
        for k in senders:
            key = table[k, 1:1 + PUBLIC_BYTES].tobytes()
            if not identity.verify(k, table[k, 1 + PUBLIC_BYTES:].tobytes(),
                                   key_message(rnd, k, key)):
                return 2, k
    seen: dict[bytes, int] = {}
    for k in senders:
        key = table[k, 1:1 + PUBLIC_BYTES].tobytes()
        if key in seen:
            return 6, k
        seen[key] = k
    return 0, me


def check_confirmations(confirms, table, senders, rnd, me: int,
                        identity: Identity) -> tuple[int, int]:
    """Every sender must have signed the very list this leader received."""
    for k in senders:
        if not confirms[k, 0] or not identity.verify(
                k, confirms[k, 1:].tobytes(), list_message(rnd, k, table)):
            return 7, k
    return 0, me
