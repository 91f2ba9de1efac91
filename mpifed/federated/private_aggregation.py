"""A round's aggregation under secure aggregation and/or differential privacy.

Each sending leader turns its institution's result into one vector
    [w * delta (+ its noise share), tail]
with delta = its model minus the round's global model. Without DP, w = n_k and the tail is
[w * loss, w]; under DP, w = 1 (the bounded weights of DP-FedAvg), delta is clipped, no loss
leaves the institution, and the tail is [b - 1/2 (+ noise share)] with adaptive clipping
(b: the under-clip bit), else empty. Under secure aggregation with DP every leader sends every
round (zeros when its secret draw left it out), so the root learns neither who took part nor how
many. With secure aggregation the vector is encoded in fixed point and masked pairwise; the root
learns only the sum. The noise shares are sized so that the shares of the leaders other than the
root and `federated.dp.colluders` of them alone give the full standard deviation.

Everything that crosses an institution's boundary here is a fixed-size numeric buffer (mpi4py's
upper-case methods), never a pickle. The root's part is a `Relay`: tests replace it by liars.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

import numpy as np

from ..comm.agree import raise_together
from ..comm.quiet import after_quiet_barrier
from ..errors import UserError
from ..xp import to_host
from .dp import (
    COUNT_SENSITIVITY,
    adapt_clip,
    clip_update,
    secure_gaussian,
    share_stddev,
    update_noise_multiplier,
)
from .identity import SIGNATURE_BYTES, Identity
from .secagg import (
    UINT,
    KeystreamBuffers,
    add_pairwise_mask,
    decode,
    encode_into,
    new_keypair,
    scale_bits,
)

TAG_KEY, TAG_VECTOR, TAG_TABLE, TAG_CONFIRM, TAG_CONFIRMS, TAG_CLIP = 21, 22, 23, 24, 25, 26
LOSS_CAP = 1e4  # losses are metrics: capped so that their fixed-point range is known
PUBLIC_BYTES = 32
ENTRY = 1 + PUBLIC_BYTES + SIGNATURE_BYTES  # present flag, X25519 key, its signature
NOISE_SIGMAS = 8  # the ring's range covers a leader's noise share to 8 standard deviations

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


def tail_fields(dp: dict | None) -> tuple[str, ...]:
    """Return the names of the values after the update in a leader's vector."""
    if dp is None:
        return ("loss", "weight")
    return ("under_clip",) if dp["adaptive"] else ()


def default_count_stddev(noise_multiplier: float, expected_sites: float) -> float:
    """Return the clip count's noise stddev when none is set: Andrew et al.'s q*K/20, raised to
    noise_multiplier for small federations, where q*K/20 would leave the updates no noise budget
    (it must exceed noise_multiplier / 2); the updates then keep z / sqrt(3/4). Zero without
    noise."""
    if noise_multiplier == 0:
        return 0.0
    return max(expected_sites / 20, noise_multiplier)


def honest_shares(fed_cfg: dict, dp: dict, senders: int) -> int:
    """Return how many noise shares neither the root nor the colluders know: K - 1 - t."""
    return senders - 1 - dp["colluders"]


def dp_settings(fed_cfg: dict, institutions: int) -> dict | None:
    """Return the [federated.dp] settings a run uses (a new dict), or None without DP.

    Derived values are filled in here, never written back into the config: an adaptive run
    without clip_count_stddev gets Andrew et al.'s q*K/20. Raises UserError when the count's
    noise would leave none for the updates, or when under secure aggregation no leader's noise
    share is left that the root and the colluders do not know.
    """
    dp = fed_cfg.get("dp")
    if not dp:
        return None
    dp = dict(dp)
    if dp["adaptive"] and dp["clip_count_stddev"] is None:
        dp["clip_count_stddev"] = default_count_stddev(dp["noise_multiplier"],
                                                       fed_cfg["fraction"] * institutions)
    if dp["adaptive"]:
        try:
            update_noise_multiplier(dp["noise_multiplier"], dp["clip_count_stddev"])
        except ValueError as err:
            raise UserError(str(err)) from None
    if fed_cfg["secure_aggregation"] and honest_shares(fed_cfg, dp, institutions) < 1:
        raise UserError(f"federated.dp.colluders: with {institutions} institutions, the root and "
                        f"{dp['colluders']} colluding leaders know every noise share; lower it "
                        f"to at most {institutions - 2} or add institutions")
    return dp


def leader_vector(params, global_host, report, weight: float, dp: dict | None,
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
    tail = [(1.0 if norm <= clip else 0.0) - COUNT_SENSITIVITY] if dp["adaptive"] else []
    return np.concatenate([delta, tail])


def noise_stddevs(dp: dict | None, clip: float) -> tuple[float, float]:
    """Return the full (stddev on the update sum, stddev on the clip count) of a round."""
    if dp is None:
        return 0.0, 0.0
    count_std = dp["clip_count_stddev"] if dp["adaptive"] else 0.0
    z_update = update_noise_multiplier(dp["noise_multiplier"], count_std)
    return z_update * clip, count_std


def ring_scales(fed_cfg: dict, dp, parties: int, clip: float = 0.0) -> tuple[float, int, int]:
    """Return (update range, fraction bits of the update part, of the tail) for the ring.

    The update range is the declared federated.secure_range times the largest weight, plus,
    under DP, NOISE_SIGMAS standard deviations of a leader's noise share (public numbers).
    """
    bits = fed_cfg["secure_bits"]
    w_max = 1.0 if dp else float(fed_cfg["secure_max_samples"])
    update_std, _ = noise_stddevs(dp, clip)
    share = share_stddev(update_std, honest_shares(fed_cfg, dp, parties)) if dp else 0.0
    bound = w_max * fed_cfg["secure_range"] + NOISE_SIGMAS * share
    return bound, scale_bits(bound, parties, bits), scale_bits(w_max * LOSS_CAP, parties, bits)


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


def key_message(round_index: int, institution: int, public: bytes) -> bytes:
    return b"mpifed-secagg-key" + struct.pack("<qq", round_index, institution) + public


def list_message(round_index: int, institution: int, table: np.ndarray) -> bytes:
    digest = hashlib.sha256(np.ascontiguousarray(table).tobytes()).digest()
    return b"mpifed-secagg-list" + struct.pack("<qq", round_index, institution) + digest


@dataclass
class PreparedRound:
    """What a round's model-independent half leaves for its second half (that round only)."""

    rnd: int
    senders: list[int]
    clip: float  # the relayed clip under DP, else 0
    size: int  # the update's length
    publics: dict[int, bytes] = field(default_factory=dict)  # a sending leader's peers (SA)


class PrivateAggregator:
    """Aggregates rounds privately (collective over the world); one per run, it owns the
    buffers that keystreams, masks and noise reuse. identity: this leader's keys
    (federated.keys), None without; relay: the root's behaviour (tests only).

    A round has two halves: `prepare` (before local training: nothing in it depends on the
    model) and the call (after training). Calling without `prepare` runs both.
    """

    def __init__(self, fed_cfg: dict, dp: dict | None, fed, identity: Identity | None = None,
                 relay: Relay | None = None):
        self.fed_cfg, self.dp, self.fed, self.identity = fed_cfg, dp, fed, identity
        self.relay = relay or Relay()
        self.buffers = KeystreamBuffers()
        self.ready: PreparedRound | None = None
        # Every rank takes part in the consistency round's agreement, leaders or not.
        self.authenticated = bool(fed_cfg["keys"])
        if self.authenticated and fed.is_leader and identity is None:
            raise ValueError("federated.keys is set but this leader was given no identity")

    def prepare(self, senders: list[int], rnd: int, state: dict, size: int) -> None:
        """Run round `rnd`'s model-independent half (collective over the world).

        The participant check, the clip relay (DP), the signed key exchange and its consistency
        round (secure aggregation); then a sending leader draws its pairwise masks and its noise
        share into the reused buffers, so that after training only one encoding pass and one
        masking pass remain. size: the update's length. Raises UserError on every rank when a
        check fails; nothing is sent then.
        """
        fed, fed_cfg, dp = self.fed, self.fed_cfg, self.dp
        self.ready = None
        if fed_cfg["secure_aggregation"] and len(senders) < fed_cfg["min_participants"]:
            raise UserError(f"secure aggregation: round {rnd + 1} would have {len(senders)} "
                            f"leaders sending, fewer than federated.min_participants = "
                            f"{fed_cfg['min_participants']} (with two, the root subtracts its "
                            "own vector and reads the other's); refused")
        ready = PreparedRound(rnd, list(senders), 0.0, size)
        if dp:
            ready.clip = self._relay_clip(state, senders, rnd)
        if fed_cfg["secure_aggregation"]:
            private = public = None
            if fed.is_leader and fed.institution in senders:
                private, public = new_keypair()  # fresh every round
            ready.publics = self._exchange_keys(senders, rnd, public)
            if ready.publics:
                self._draw_mask_and_noise(private, ready)
        self.ready = ready

    def __call__(self, params, global_host, report, senders: list[int], sampled: bool, rnd: int,
                 state: dict) -> dict | None:
        """Aggregate one round (its second half, after `prepare`); on the root return the sums,
        else None.

        senders: the institutions whose leaders send a vector (public: every institution under
        secure aggregation with DP); sampled: whether this institution's vector carries its
        update (False: zeros). Returns {"delta_sum", one key per tail field, "bytes", "clip"}.
        """
        ready = self.ready
        if ready is None or ready.rnd != rnd or ready.senders != list(senders):
            self.prepare(senders, rnd, state, params.size)
            ready = self.ready
        self.ready = None  # a round's keys, masks and noise serve that round once
        fed, dp = self.fed, self.dp
        if self.fed_cfg["secure_aggregation"]:
            sums = self._secure_sum(params, global_host, report, sampled, ready)
        else:
            vector = None
            if fed.is_leader and fed.institution in senders:
                weight = 1.0 if dp else report.samples
                vector = raise_together(fed.world, lambda: after_quiet_barrier(
                    fed.world, lambda: leader_vector(params, global_host, report, weight, dp,
                                                     ready.clip) if sampled else
                    np.zeros(ready.size + len(tail_fields(dp)))))
            else:
                raise_together(fed.world, lambda: after_quiet_barrier(fed.world, lambda: None))
            sums = self._plain_sum(vector, senders, ready.clip, ready.size)
        if sums is not None:
            sums["clip"] = ready.clip
        return sums

    # -- the clip ---------------------------------------------------------------------------

    def _relay_clip(self, state, senders, rnd) -> float:
        """The root relays the clip to every sending leader; each checks it is finite and > 0."""
        fed, buf = self.fed, np.zeros(1)
        if fed.is_root:
            buf[0] = float(state.get("dp_clip", self.dp["clip"]))
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
        self._agree(rnd, 1 if sending and not ok else 0, fed.institution)
        return clip

    # -- refusals, agreed without pickle ------------------------------------------------------

    def _agree(self, rnd: int, code: int, culprit: int) -> None:
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

    # -- keys -------------------------------------------------------------------------------

    def _exchange_keys(self, senders, rnd, public: bytes | None) -> dict[int, bytes]:
        """Leaders send signed keys; the root relays the list; every sender checks it, then
        (with identities) confirms it by signing it (Bonawitz et al.'s consistency round)."""
        fed, count = self.fed, len(self.fed.sizes)
        table = np.zeros((count, ENTRY), dtype=np.uint8)
        code, culprit = 0, fed.institution
        sending = fed.is_leader and fed.institution in senders
        if sending:
            mine = np.zeros(ENTRY, dtype=np.uint8)
            mine[0] = 1
            mine[1:1 + PUBLIC_BYTES] = np.frombuffer(public, dtype=np.uint8)
            if self.identity is not None:
                sig = self.identity.sign(key_message(rnd, fed.institution, public))
                mine[1 + PUBLIC_BYTES:] = np.frombuffer(sig, dtype=np.uint8)
            table = self._relay(mine, senders, TAG_KEY, TAG_TABLE, self.relay.key_tables)
            code, culprit = self._check_keys(table, senders, rnd, public)
        self._agree(rnd, code, culprit)
        if self.authenticated:
            code, culprit = 0, fed.institution
            if sending:
                sig = self.identity.sign(list_message(rnd, fed.institution, table))
                entry = np.zeros(1 + SIGNATURE_BYTES, dtype=np.uint8)
                entry[0], entry[1:] = 1, np.frombuffer(sig, dtype=np.uint8)
                confirms = self._relay(entry, senders, TAG_CONFIRM, TAG_CONFIRMS,
                                       self.relay.confirmations)
                code, culprit = self._check_confirmations(confirms, table, senders, rnd)
            self._agree(rnd, code, culprit)
        return {k: table[k, 1:1 + PUBLIC_BYTES].tobytes() for k in senders} if sending else {}

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

    def _check_keys(self, table, senders, rnd, public) -> tuple[int, int]:
        """Return (refusal code, culprit) for a relayed key list; (0, me) when it holds."""
        me, present = self.fed.institution, set(np.flatnonzero(table[:, 0]).tolist())
        for k in senders:
            if k not in present:
                return 3, k
        for k in sorted(present - set(senders)):
            return 4, k
        if table[me, 1:1 + PUBLIC_BYTES].tobytes() != public:
            return 5, me
        if self.identity is not None:
            for k in senders:
                key = table[k, 1:1 + PUBLIC_BYTES].tobytes()
                if not self.identity.verify(k, table[k, 1 + PUBLIC_BYTES:].tobytes(),
                                            key_message(rnd, k, key)):
                    return 2, k
        seen: dict[bytes, int] = {}
        for k in senders:
            key = table[k, 1:1 + PUBLIC_BYTES].tobytes()
            if key in seen:
                return 6, k
            seen[key] = k
        return 0, me

    def _check_confirmations(self, confirms, table, senders, rnd) -> tuple[int, int]:
        """Every sender must have signed the very list this leader received."""
        for k in senders:
            if not confirms[k, 0] or not self.identity.verify(
                    k, confirms[k, 1:].tobytes(), list_message(rnd, k, table)):
                return 7, k
        return 0, self.fed.institution

    # -- sums -------------------------------------------------------------------------------

    def _plain_sum(self, vector, senders, clip, size) -> dict | None:
        """Leaders send their vectors; the root sums them and adds the DP noise itself."""
        fed, width = self.fed, size + len(tail_fields(self.dp))
        if fed.is_leader and not fed.is_root and vector is not None:
            fed.leaders.Send(vector, 0, TAG_VECTOR)
        if not fed.is_root:
            return None
        total, received = np.zeros(width), 0
        for k in senders:
            if k == fed.institution:
                total += vector
                continue
            buf = np.empty(width)
            fed.leaders.Recv(buf, k, TAG_VECTOR)
            total += buf
            received += buf.nbytes
        update_std, count_std = noise_stddevs(self.dp, clip)
        total[:size] += secure_gaussian(size, update_std)
        if width > size and count_std:
            total[size:] += secure_gaussian(width - size, count_std)
        return self._sums(total, size, received)

    def _draw_mask_and_noise(self, private, ready: PreparedRound) -> None:
        """Fill the buffers "mask" (this leader's pairwise masks, ring elements) and "vector"
        (its noise share under DP, else zeros), both [update, tail] wide."""
        fed_cfg, dp, width = self.fed_cfg, self.dp, ready.size + len(tail_fields(self.dp))
        mask = self.buffers.array("mask", UINT[fed_cfg["secure_bits"]], width)
        mask[:] = 0
        add_pairwise_mask(mask, self.fed.institution, private, ready.publics, ready.rnd,
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

    def _add_update(self, vector, params, global_host, report, ready: PreparedRound) -> list:
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
        return [(1.0 if norm <= clip else 0.0) - COUNT_SENSITIVITY] if dp["adaptive"] else []

    def _masked_ring(self, params, global_host, report, sampled, ready: PreparedRound):
        """Return a leader's [update + noise share, tail] in fixed point, masked (or raise).

        The noise share and the masks wait in the buffers since `prepare`; the result is the
        buffer "ring", valid until the next round.
        """
        fed_cfg, dp, me, size = self.fed_cfg, self.dp, self.fed.institution, ready.size
        bits = fed_cfg["secure_bits"]
        w_max = 1.0 if dp else float(fed_cfg["secure_max_samples"])
        bound, f_delta, f_tail = ring_scales(fed_cfg, dp, len(ready.publics), ready.clip)
        if dp is None and sampled and report.samples > w_max:
            raise UserError(f"secure aggregation: institution {me} has {report.samples:.0f} "
                            "samples, above federated.secure_max_samples; raise it")
        vector = self.buffers.array("vector", np.float64, size + len(tail_fields(dp)))
        if sampled:
            vector[size:] += self._add_update(vector, params, global_host, report, ready)
        ring = self.buffers.array("ring", UINT[bits], vector.size)
        encode_into(vector[:size], bound, f_delta, ring[:size], fed_cfg["secure_out_of_range"])
        encode_into(vector[size:], w_max * LOSS_CAP, f_tail, ring[size:], "clip")
        return np.add(ring, self.buffers.array("mask", UINT[bits], vector.size), out=ring)

    def _secure_sum(self, params, global_host, report, sampled, ready: PreparedRound
                    ) -> dict | None:
        """Masked fixed-point vectors: the root relayed fresh public keys (in `prepare`) and
        learns only the sum."""
        fed, bits, senders, size = self.fed, self.fed_cfg["secure_bits"], ready.senders, ready.size
        # the leaders left out of the round mask their noise at once, then wait without
        # taking a core from the ones still training
        ring = raise_together(fed.world, lambda: after_quiet_barrier(fed.world, lambda: (
            self._masked_ring(params, global_host, report, sampled, ready)
            if ready.publics else None)))
        if ring is not None and not fed.is_root:
            fed.leaders.Send(ring, 0, TAG_VECTOR)
        if not fed.is_root:
            return None
        width = size + len(tail_fields(self.dp))
        total = self.buffers.array("total", ring_dtype(bits), width)
        total[:] = ring if ring is not None else 0
        buf, received = self.buffers.array("received", ring_dtype(bits), width), 0
        for k in senders:
            if k == fed.institution:
                continue
            fed.leaders.Recv(buf, k, TAG_VECTOR)
            np.add(total, buf, out=total)  # wraps modulo 2^bits: the masks cancel here
            received += buf.nbytes
        received += (len(senders) - 1) * (ENTRY + (1 + SIGNATURE_BYTES) * self.authenticated)
        _, f_delta, f_tail = ring_scales(self.fed_cfg, self.dp, max(len(senders), 1), ready.clip)
        values = np.empty(width)  # handed to the caller: not a reused buffer
        decode(total[:size], f_delta, bits, values[:size])
        decode(total[size:], f_tail, bits, values[size:])
        return self._sums(values, size, received)

    def _sums(self, total, size, received) -> dict:
        sums = {"delta_sum": total[:size], "bytes": received}
        for i, name in enumerate(tail_fields(self.dp)):
            sums[name] = float(total[size + i])
        return sums


def ring_dtype(bits: int):
    return np.uint64 if bits == 64 else np.uint32


def private_aggregate(fed_cfg, dp, fed, params, global_host, report, senders, rnd, state,
                      sampled: bool = True, identity=None, relay=None) -> dict | None:
    """One round with a one-off PrivateAggregator (tests; runs keep one aggregator)."""
    return PrivateAggregator(fed_cfg, dp, fed, identity, relay)(
        params, global_host, report, senders, sampled, rnd, state)


def mean_update(sums: dict, dp: dict | None, institutions: int, q: float) -> np.ndarray:
    """Return the mean update: / sum of weights, or / q*K (DP's fixed denominator)."""
    denominator = q * institutions if dp else sums["weight"]
    if denominator <= 0:
        return np.zeros_like(sums["delta_sum"])
    return sums["delta_sum"] / denominator


def next_clip(dp: dict, clip: float, sums: dict, institutions: int, q: float) -> float:
    """Adaptive clipping: move the clip toward the target quantile of the update norms.

    The noised sum of (b - 1/2) over the participants, / q K, plus the 1/2 added back.
    """
    if not dp["adaptive"]:
        return clip
    fraction_under = sums["under_clip"] / max(q * institutions, 1e-12) + COUNT_SENSITIVITY
    return adapt_clip(clip, fraction_under, dp["target_quantile"], dp["clip_lr"])


def apply_private_sums(strategy, dp, sums, global_params, institutions: int, q: float,
                       state: dict, hyper):
    """On the root: turn the private sums into (new global model, server state, record fields).

    strategy: a STRATEGIES function, applied to the one averaged model (global + mean update).
    The record fields: without DP the institutions' mean loss; under DP the clip used (no loss:
    it would be a release outside the accounting).
    """
    mean = mean_update(sums, dp, institutions, q)
    new, new_state = strategy(global_params, [(global_params + mean, 1.0, 1.0)], state, hyper)
    record = {}
    if dp is None and sums["weight"] > 0:
        record["loss"] = sums["loss"] / sums["weight"]
    if dp:
        new_state["dp_clip"] = np.array(next_clip(dp, sums["clip"], sums, institutions, q))
        record["clip"] = sums["clip"]
    return new, new_state, record
