"""The signed transcript of a round: what the messages hold, what a leader checks.

A sending leader's entry in the key table is [present flag, X25519 public key, its Ed25519
signature over `key_message`]. Every sender then sends its own view of the round (`RoundView`:
the round number, the clip it received, the SHA-256 of the global model it starts from, z, q,
the colluder count, sigma_b, the ring width, the fixed-point fraction bits and the encoding range)
and, with identities, its signature over `transcript_message` (the view and the whole key table
it received: Bonawitz et al.'s consistency round, extended to the round's parameters). The root
relays them; each sender compares every other sender's view with its own, field by field, and
verifies each signature over its OWN view, so a root that relays different lists, clips or
models to different leaders, or alters a relayed view, is caught. Without identities the views
are still compared (unsigned: a root that also forges the relayed views goes unseen).
Pure: the tables are numpy arrays, nothing here sends.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import astuple, dataclass

import numpy as np

from ..xp import to_host
from .identity import SIGNATURE_BYTES, Identity
from .masked_sum import RANGE_CODE, noise_stddevs, ring_scales

PUBLIC_BYTES = 32
ENTRY = 1 + PUBLIC_BYTES + SIGNATURE_BYTES  # present flag, X25519 key, its signature

# A round's view, in the order the fields are compared: (what the refusal names, its format).
FIELDS = (
    ("the round number", "q"),
    ("the clip", "d"),
    ("the round's starting global model (its SHA-256)", "32s"),
    ("the noise multiplier z", "d"),
    ("the sampled fraction q", "d"),
    ("the colluder count", "q"),
    ("the clip count's noise sigma_b", "d"),
    ("the ring width (secure_bits)", "q"),
    ("the fixed-point fraction bits", "2q"),
    ("the encoding range", "d"),
)
VIEW = struct.Struct("<" + "".join(fmt for _, fmt in FIELDS))  # little-endian, no padding
FIRST_FIELD_CODE = 8
MODEL_CODE = FIRST_FIELD_CODE + 2  # also a rank holding another model than its leader

# What an honest leader checks, by refusal code (the codes travel; each rank writes the text).
# None names a value, a step or a rank of another institution's data.
CHECKS = {
    1: "the clip relayed by the root is not finite and positive",
    2: "a relayed key's signature does not verify (a substituted key)",
    3: "a participant's key is missing from the relayed list",
    4: "the relayed list holds a key of an institution that does not take part",
    5: "its own key came back altered",
    6: "two institutions present the same public key (a reused key)",
    7: "a round transcript's signature does not verify (the root sent different lists to "
       "different leaders, or altered a relayed transcript)",
    **{FIRST_FIELD_CODE + i: f"the round transcript differs from its own: {name}"
       for i, (name, _) in enumerate(FIELDS)},
}
# Refusals no leader is named for (agreed anonymously): data-dependent or noise-dependent.
ANONYMOUS = {
    RANGE_CODE: "an institution's vector is outside the declared range",
}


def _field_spans() -> list[tuple[int, int]]:
    spans, start = [], 0
    for _, fmt in FIELDS:
        end = start + struct.calcsize("<" + fmt)
        spans.append((start, end))
        start = end
    return spans


SPANS = _field_spans()


@dataclass(frozen=True)
class RoundView:
    """One leader's view of a round: what it checks every other sender shares."""

    rnd: int
    clip: float
    model_sha256: bytes
    noise_multiplier: float
    fraction: float
    colluders: int
    count_stddev: float
    bits: int
    fraction_bits: tuple[int, int]  # of the update part, of the tail
    bound: float  # the update part's encoding range

    def to_bytes(self) -> bytes:
        values = list(astuple(self))
        values[8:9] = values[8]  # the pair of fraction bits, flat
        return VIEW.pack(*values)


def model_digest(model) -> bytes:
    """Return the SHA-256 of a model's flat parameters as this rank holds them (host bytes)."""
    host = np.ascontiguousarray(to_host(model))
    return hashlib.sha256(host.view(np.uint8).reshape(-1)).digest()


def round_view(fed_cfg, dp, rnd: int, clip: float, digest: bytes, parties: int) -> RoundView:
    """Return this leader's view of round `rnd` from its own settings, the clip it received
    and the digest of the model it starts from. parties: the leaders sending."""
    bound, f_delta, f_tail = ring_scales(fed_cfg, dp, parties, clip)
    return RoundView(rnd, float(clip), digest, float(dp.noise_multiplier) if dp else 0.0,
                     float(fed_cfg.fraction), int(dp.colluders) if dp else 0,
                     float(noise_stddevs(dp, clip)[1]), int(fed_cfg.secure_bits),
                     (int(f_delta), int(f_tail)), float(bound))


def key_message(round_index: int, institution: int, public: bytes) -> bytes:
    """Return what an institution signs for its round key."""
    return b"mpifed-secagg-key" + struct.pack("<qq", round_index, institution) + public


def transcript_message(round_index: int, institution: int, table: np.ndarray,
                       view: bytes) -> bytes:
    """Return what an institution signs to confirm a round: the key table it received and
    its view of the round (`RoundView.to_bytes`)."""
    digest = hashlib.sha256(np.ascontiguousarray(table).tobytes()).digest()
    return (b"mpifed-secagg-round" + struct.pack("<qq", round_index, institution) + digest
            + view)


def confirmation_bytes(authenticated: bool) -> int:
    """Return the length of a sender's confirmation: [flag, view, signature if identities]."""
    return 1 + VIEW.size + SIGNATURE_BYTES * authenticated


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


def differing_field(theirs: bytes, mine: bytes) -> int | None:
    """Return the index of the first field in which two views differ, None when equal."""
    for i, (start, end) in enumerate(SPANS):
        if theirs[start:end] != mine[start:end]:
            return i
    return None


def check_confirmations(confirms, table, senders, rnd, me: int, view: bytes,
                        identity: Identity | None) -> tuple[int, int]:
    """Every sender must hold this leader's view of the round and (with identities) have
    signed it with the very key table this leader received; (0, me) when they do."""
    for k in senders:
        if not confirms[k, 0]:
            return 7, k
        field = differing_field(confirms[k, 1:1 + VIEW.size].tobytes(), view)
        if field is not None:
            return FIRST_FIELD_CODE + field, k
    if identity is not None:
        for k in senders:
            if not identity.verify(k, confirms[k, 1 + VIEW.size:].tobytes(),
                                   transcript_message(rnd, k, table, view)):
                return 7, k
    return 0, me
