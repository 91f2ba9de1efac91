"""A secure round's key exchange over the leaders' communicator, relayed by the root.

Each sending leader sends its signed round key to the root, the root relays the key table, every
sender checks it (`transcript.py`); then every sender sends its view of the round (the clip it
received, its model's hash, its parameters) with, given identities, its signature over that
view and the table, and the root relays those too; each sender compares them with its own view
(the round transcript). Under DP the root first relays the clip the same way. Every rank then
learns every leader's refusal, so all raise the same message before any masked vector is sent.
Only fixed-size uint8/float64/int64 buffers cross an institution's boundary, never a pickle.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..errors import UserError
from .identity import Identity
from .transcript import (
    ANONYMOUS,
    CHECKS,
    ENTRY,
    PUBLIC_BYTES,
    VIEW,
    check_confirmations,
    check_keys,
    confirmation_bytes,
    key_message,
    transcript_message,
)

# 22 is the masked or plain vector's tag (private_aggregation.py).
TAG_KEY, TAG_TABLE, TAG_CONFIRM, TAG_CONFIRMS, TAG_CLIP = 21, 23, 24, 25, 26


class Relay:
    """The root's half of the exchange: what it relays to each leader (honest: the same to all).

    Each method returns one buffer per leader (index = institution). Tests substitute roots
    that lie, to check that every honest leader refuses before any masked vector is sent.
    """

    def clips(self, clip: np.ndarray, leaders: int) -> list[np.ndarray]:
        return [clip] * leaders

    def key_tables(self, table: np.ndarray, leaders: int) -> list[np.ndarray]:
        return [table] * leaders

    def confirmations(self, table: np.ndarray, leaders: int) -> list[np.ndarray]:
        return [table] * leaders


class KeyExchange:
    """The relayed exchanges of a run's rounds (collective over the world: every rank agrees
    on the refusals). identity: this leader's keys, None without; relay: the root's behaviour;
    authenticated: whether the run has identities (federated.keys), known on every rank."""

    def __init__(self, fed, identity: Identity | None, relay: Relay, authenticated: bool):
        self.fed, self.identity, self.relay = fed, identity, relay
        self.authenticated = authenticated

    # -- the clip ---------------------------------------------------------------------------

    def relay_clip(self, clip: float, senders, rnd) -> float:
        """The root relays its `clip` to every sending leader; each checks it is finite and
        > 0. Returns the clip this rank received (the root's own on the root)."""
        fed, buf = self.fed, np.zeros(1)
        if fed.is_root:
            buf[0] = clip
            clips = self.relay.clips(buf, len(fed.sizes))
            for k in senders:
                if k != fed.institution:
                    fed.leaders.Send(np.ascontiguousarray(clips[k], dtype=np.float64), k,
                                     TAG_CLIP)
            buf = np.array(clips[fed.institution], dtype=np.float64)
        elif fed.is_leader and fed.institution in senders:
            fed.leaders.Recv(buf, 0, TAG_CLIP)
        clip = float(buf[0])
        sending = fed.is_leader and fed.institution in senders
        ok = np.isfinite(clip) and clip > 0
        self.agree(rnd, 1 if sending and not ok else 0, fed.institution)
        return clip

    # -- refusals, agreed without pickle ------------------------------------------------------

    def agree(self, rnd: int, code: int, culprit: int) -> None:
        """Every rank learns every leader's refusal (int64[3] each); all raise the same."""
        fed = self.fed
        mine = np.array([code, fed.institution, culprit], dtype=np.int64)
        every = np.empty((fed.world.size, 3), dtype=np.int64)
        fed.world.Allgather(mine, every)
        refused = every[every[:, 0] > 0]
        if not len(refused):
            return
        code, institution, culprit = (int(v) for v in refused[0])
        who = sorted({int(k) for k in refused[:, 1]})
        raise UserError(f"secure aggregation: round {rnd + 1} refused by institution "
                        f"{institution}: {CHECKS[code]} (institution {culprit}); refused by "
                        f"institutions {who}; no masked vector was sent")

    def agree_anonymously(self, rnd: int, code: int) -> None:
        """Every rank learns whether any rank refused with an `ANONYMOUS` code, not which one
        (an int64 MAX): all raise one generic message that names no rank and no value."""
        fed = self.fed
        flag = np.array([code], dtype=np.int64)
        fed.world.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
        if flag[0] > 0:
            raise UserError(f"secure aggregation: round {rnd + 1} refused: "
                            f"{ANONYMOUS[int(flag[0])]} (code {int(flag[0])}); no masked "
                            "vector was sent. Each institution's own log says more")

    # -- keys -------------------------------------------------------------------------------

    def exchange_keys(self, senders, rnd, public: bytes | None, view: bytes | None = None,
                      local_code: int = 0) -> dict[int, bytes]:
        """Leaders send signed keys; the root relays the list; every sender checks it, then
        confirms the round (`confirm_round`). Returns the senders' public keys on a sending
        leader, else {}. The root relays every round, also one it sits out (fraction < 1
        without DP), with an empty row of its own.

        view: this sending leader's `RoundView.to_bytes()`; local_code: a refusal this leader
        found inside its institution (a rank holding another model), reported with the
        transcript's."""
        fed, count = self.fed, len(self.fed.sizes)
        table = np.zeros((count, ENTRY), dtype=np.uint8)
        code, culprit = 0, fed.institution
        sending = fed.is_leader and fed.institution in senders
        mine = np.zeros(ENTRY, dtype=np.uint8)
        if sending:
            mine[0] = 1
            mine[1:1 + PUBLIC_BYTES] = np.frombuffer(public, dtype=np.uint8)
            if self.identity is not None:
                sig = self.identity.sign(key_message(rnd, fed.institution, public))
                mine[1 + PUBLIC_BYTES:] = np.frombuffer(sig, dtype=np.uint8)
        if sending or fed.is_root:
            table = self._relay(mine, senders, TAG_KEY, TAG_TABLE, self.relay.key_tables)
        if sending:
            code, culprit = check_keys(table, senders, rnd, public, fed.institution,
                                       self.identity)
        self.agree(rnd, code, culprit)
        self.confirm_round(table, senders, rnd, view, local_code)
        return {k: table[k, 1:1 + PUBLIC_BYTES].tobytes() for k in senders} if sending else {}

    def confirm_round(self, table, senders, rnd, view: bytes | None, local_code: int) -> None:
        """Each sender sends [1, its view, its signature over the view and `table`] (no
        signature without identities); the root relays them all; each sender checks every
        other's against its own view (`check_confirmations`). Collective over the world."""
        fed = self.fed
        sending = fed.is_leader and fed.institution in senders
        code, culprit = 0, fed.institution
        entry = np.zeros(confirmation_bytes(self.authenticated), dtype=np.uint8)
        if sending:
            entry[0] = 1
            entry[1:1 + VIEW.size] = np.frombuffer(view, dtype=np.uint8)
            if self.authenticated:
                sig = self.identity.sign(transcript_message(rnd, fed.institution, table, view))
                entry[1 + VIEW.size:] = np.frombuffer(sig, dtype=np.uint8)
        if sending or fed.is_root:
            confirms = self._relay(entry, senders, TAG_CONFIRM, TAG_CONFIRMS,
                                   self.relay.confirmations)
        if sending:
            code, culprit = check_confirmations(confirms, table, senders, rnd, fed.institution,
                                                view, self.identity)
        if local_code and not code:
            code, culprit = local_code, fed.institution
        self.agree(rnd, code, culprit)

    def relayed_bytes(self) -> int:
        """Return the bytes one sender sends the root in the exchange (its key, its
        confirmation of the round)."""
        return ENTRY + confirmation_bytes(self.authenticated)

    def _relay(self, entry, senders, tag_up, tag_down, relay_fn) -> np.ndarray:
        """Each sender sends `entry` to the root; the root returns the table (via the relay)."""
        fed = self.fed
        table = np.zeros((len(fed.sizes), entry.size), dtype=np.uint8)
        if fed.is_root:
            table[fed.institution] = entry
            for k in senders:
                if k != fed.institution:
                    fed.leaders.Recv(table[k], k, tag_up)
            tables = relay_fn(table, len(fed.sizes))
            for k in senders:
                if k != fed.institution:
                    fed.leaders.Send(np.ascontiguousarray(tables[k], dtype=np.uint8), k,
                                     tag_down)
            return np.array(tables[fed.institution], dtype=np.uint8)
        fed.leaders.Send(entry, 0, tag_up)
        fed.leaders.Recv(table, 0, tag_down)
        return table
