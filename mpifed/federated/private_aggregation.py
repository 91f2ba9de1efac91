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

This module runs a round's two halves in order; the pieces live beside it: the relayed key
exchange and clip (`key_exchange.py`), the signed transcript and its checks (`transcript.py`),
the vectors' arithmetic (`masked_sum.py`), the settings (`dp_settings.py`) and the root's update
from the sums (`private_update.py`). Everything that crosses an institution's boundary is a
fixed-size numeric buffer (mpi4py's upper-case methods), never a pickle. The root's part of the
exchange is a `Relay`: tests replace it by liars.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..comm.agree import raise_together
from ..comm.quiet import after_quiet_barrier
from ..errors import UserError
from ..log import get_logger
from .dp import clip_update, secure_gaussian
from .identity import Identity
from .key_exchange import KeyExchange, Relay
from .masked_sum import (
    MaskedSum,
    PreparedRound,
    leader_vector,
    noise_stddevs,
    split_sums,
    tail_fields,
)
from .rotated import RotatedCodec, rounding_rng
from .rotated_sum import RotatedMaskedSum
from .secagg import new_keypair
from .transcript import MODEL_CODE, model_digest, round_view

TAG_VECTOR = 22  # the key exchange's tags are 21 and 23-26 (key_exchange.py)
log = get_logger(__name__)


class PrivateAggregator:
    """Aggregates rounds privately (collective over the world); one per run, it owns the
    buffers that keystreams, masks and noise reuse. identity: this leader's keys
    (federated.keys), None without; relay: the root's behaviour (tests only).

    A round has two halves: `prepare` (before local training: nothing in it depends on the
    model) and the call (after training). Calling without `prepare` runs both.
    """

    def __init__(self, fed_cfg, dp, fed, identity: Identity | None = None,
                 relay: Relay | None = None, codec: RotatedCodec | None = None, seed: int = 0):
        self.fed_cfg, self.dp, self.fed, self.identity = fed_cfg, dp, fed, identity
        self.codec, self.seed = codec, seed  # federated.compression = "rotated" (DP alone)
        self.ready: PreparedRound | None = None
        # Every rank takes part in the consistency round's agreement, leaders or not.
        self.authenticated = bool(fed_cfg.keys)
        if self.authenticated and fed.is_leader and identity is None:
            raise ValueError("federated.keys is set but this leader was given no identity")
        self.exchange = KeyExchange(fed, identity, relay or Relay(), self.authenticated)
        self.masked = (RotatedMaskedSum(fed_cfg, dp, fed.institution, codec)
                       if codec is not None and fed_cfg.secure_aggregation
                       else MaskedSum(fed_cfg, dp, fed.institution))

    def prepare(self, senders: list[int], rnd: int, state: dict, size: int,
                model=None) -> None:
        """Run round `rnd`'s model-independent half (collective over the world).

        The participant check, the clip relay (DP), the signed key exchange and the round
        transcript (secure aggregation); then a sending leader draws its pairwise masks and its
        noise share into the reused buffers, so that after training only one encoding pass and
        one masking pass remain. size: the update's length; model: the round's starting global
        model as this rank holds it (None on a rank that holds only a chunk), hashed into the
        transcript. Raises UserError on every rank when a check fails; nothing is sent then.
        """
        fed, fed_cfg, dp = self.fed, self.fed_cfg, self.dp
        self.ready = None
        if fed_cfg.secure_aggregation and len(senders) < fed_cfg.min_participants:
            raise UserError(f"secure aggregation: round {rnd + 1} would have {len(senders)} "
                            f"leaders sending, fewer than federated.min_participants = "
                            f"{fed_cfg.min_participants} (with two, the root subtracts its "
                            "own vector and reads the other's); refused")
        ready = PreparedRound(rnd, list(senders), 0.0, size)
        if dp:  # the root's clip: the server state's (adaptive), else the configured one
            ready.clip = self.exchange.relay_clip(float(state.get("dp_clip", dp.clip)),
                                                  senders, rnd)
        if fed_cfg.secure_aggregation:
            digest, site_code = self._site_model_digest(model, rnd)
            sending = fed.is_leader and fed.institution in senders
            # the ring's scales (a ring too small for this clip) fail on every rank together
            view = raise_together(fed.world, lambda: round_view(
                fed_cfg, dp, rnd, ready.clip, digest, len(senders)).to_bytes()
                if sending else None)
            private = public = None
            if sending:
                private, public = new_keypair()  # fresh every round
            ready.publics = self.exchange.exchange_keys(senders, rnd, public, view, site_code)
            if ready.publics:
                self.masked.draw_mask_and_noise(private, ready)
        self.ready = ready

    def _site_model_digest(self, model, rnd: int) -> tuple[bytes, int]:
        """Return (the SHA-256 of this rank's starting model, a refusal code on the leader when
        a rank of its institution holding the whole model holds another one) (collective over
        the site). Every rank's model then is the one its leader's transcript names."""
        fed = self.fed
        mine = np.zeros(1 + 32, dtype=np.uint8)
        if model is not None:
            mine[0], mine[1:] = 1, np.frombuffer(model_digest(model), dtype=np.uint8)
        every = np.empty((fed.site.size, mine.size), dtype=np.uint8)
        fed.site.Allgather(mine, every)
        digest = every[0, 1:].tobytes()  # the leader's
        held = every[every[:, 0] == 1, 1:]
        differs = fed.is_leader and bool((held != every[0, 1:]).any())
        if differs:
            log.warning("secure aggregation: round %d: a rank of this institution holds another "
                        "starting model than its leader; refusing the round", rnd + 1)
        return digest, (MODEL_CODE if differs else 0)

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
            self.prepare(senders, rnd, state, params.size, global_host)
            ready = self.ready
        self.ready = None  # a round's keys, masks and noise serve that round once
        fed, dp = self.fed, self.dp
        if self.fed_cfg.secure_aggregation and self.codec is not None:
            sums = self._secure_rotated_sum(params, global_host, report, sampled, ready)
        elif self.fed_cfg.secure_aggregation:
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
            sums = self._plain_sum(vector, senders, ready.clip, ready.size, rnd)
        if sums is not None:
            sums["clip"] = ready.clip
        return sums

    def _plain_sum(self, vector, senders, clip, size, rnd: int) -> dict | None:
        """Leaders send their vectors; the root sums them and adds the DP noise itself.

        With a codec a vector travels rotated and quantised; the root decodes each and clips
        it to the round's clip again (quantisation can lengthen it by up to a step per
        coordinate), so every institution's share of the sum keeps norm <= clip and the noise
        the root adds after the sum is calibrated as without compression."""
        fed, width = self.fed, size + len(tail_fields(self.dp))
        if vector is not None and self.codec is not None:
            vector = self.codec.encode(vector[:size], rnd, rounding_rng(
                self.seed, rnd, fed.institution, secret=True), tail=vector[size:])
        if fed.is_leader and not fed.is_root and vector is not None:
            fed.leaders.Send(vector, 0, TAG_VECTOR)
        if not fed.is_root:
            return None
        total, received = np.zeros(width), 0
        for k in senders:
            if k == fed.institution:
                total += self._decoded(vector, size, clip, rnd)
                continue
            buf = self._receive_buffer(size)
            fed.leaders.Recv(buf, k, TAG_VECTOR)
            total += self._decoded(buf, size, clip, rnd)
            received += buf.nbytes
        update_std, count_std = noise_stddevs(self.dp, clip)
        total[:size] += secure_gaussian(size, update_std)
        if width > size and count_std:
            total[size:] += secure_gaussian(width - size, count_std)
        return split_sums(total, size, received, self.dp)

    def _secure_rotated_sum(self, params, global_host, report, sampled, ready: PreparedRound
                            ) -> dict | None:
        """Rotated, quantised, masked integers in few bits (`rotated_sum.py`): the senders
        agree on the quantiser's range, then the root adds their packed integers and learns
        only the sum (and the range)."""
        fed, masked, senders = self.fed, self.masked, ready.senders
        rotated = raise_together(fed.world, lambda: after_quiet_barrier(fed.world, lambda: (
            masked.rotated_update(params, global_host, report, sampled, ready)
            if ready.publics else None)))
        bound = self._agreed_bound(rotated[0] if rotated is not None else None)
        wire = masked.masked_wire(*rotated, bound, ready) if rotated is not None else None
        if wire is not None and not fed.is_root:
            fed.leaders.Send(wire, 0, TAG_VECTOR)
        if not fed.is_root:
            return None
        received = [0]

        def wires():
            if wire is not None:
                yield wire
            for k in senders:
                if k != fed.institution:
                    buf = np.empty(masked.wire_bytes(ready), dtype=np.uint8)
                    fed.leaders.Recv(buf, k, TAG_VECTOR)
                    received[0] += buf.nbytes
                    yield buf
        total, tail = masked.sum_wires(wires(), ready)
        received[0] += sum(k != fed.institution for k in senders) * self.exchange.relayed_bytes()
        values = masked.decode_sum(total, tail, bound, ready)
        return split_sums(values, ready.size, received[0], self.dp)

    def _agreed_bound(self, rotated) -> float:
        """Return the largest |coordinate| of every sender's rotated update: an MPI MAX over
        the leaders (a leader not sending gives 0); 0 on the other ranks, which send nothing."""
        fed = self.fed
        if fed.leaders is None:
            return 0.0
        mine = np.array([float(np.abs(rotated).max()) if rotated is not None and rotated.size
                         else 0.0])
        fed.leaders.Allreduce(MPI.IN_PLACE, mine, op=MPI.MAX)
        return float(mine[0])

    def _receive_buffer(self, size: int) -> np.ndarray:
        """Return a buffer for one leader's vector: float64 [update, tail], or the codec's
        bytes."""
        tail = len(tail_fields(self.dp))
        if self.codec is None:
            return np.empty(size + tail)
        return np.empty(self.codec.wire_bytes(size, tail), dtype=np.uint8)

    def _decoded(self, buf, size: int, clip: float, rnd: int) -> np.ndarray:
        """Return a received vector as float64 [update, tail]: as it came, or decoded and, under
        DP, its update clipped to norm <= clip again."""
        if self.codec is None:
            return buf
        delta, tail = self.codec.decode(buf, rnd, size, len(tail_fields(self.dp)))
        if self.dp is not None:
            delta, _ = clip_update(delta, clip)
        return np.concatenate([delta, tail])

    def _secure_sum(self, params, global_host, report, sampled, ready: PreparedRound
                    ) -> dict | None:
        """Masked fixed-point vectors: the root relayed fresh public keys (in `prepare`) and
        learns only the sum."""
        fed, senders, size = self.fed, ready.senders, ready.size
        # the leaders left out of the round mask their noise at once, then wait without
        # taking a core from the ones still training
        ring, code = raise_together(fed.world, lambda: after_quiet_barrier(fed.world, lambda: (
            self.masked.masked_ring(params, global_host, report, sampled, ready)
            if ready.publics else (None, 0))))
        self.exchange.agree_anonymously(ready.rnd, code)  # e.g. out of range: no rank named
        if ring is not None and not fed.is_root:
            fed.leaders.Send(ring, 0, TAG_VECTOR)
        if not fed.is_root:
            return None
        total, buf = self.masked.sum_buffers(ring, size)
        received = 0
        for k in senders:
            if k == fed.institution:
                continue
            fed.leaders.Recv(buf, k, TAG_VECTOR)
            np.add(total, buf, out=total)  # wraps modulo 2^bits: the masks cancel here
            received += buf.nbytes
        received += sum(k != fed.institution for k in senders) * self.exchange.relayed_bytes()
        values = self.masked.decode_sum(total, len(senders), ready)
        return split_sums(values, size, received, self.dp)
