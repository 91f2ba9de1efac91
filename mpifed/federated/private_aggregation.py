"""A round's aggregation under secure aggregation and/or differential privacy.

Each participating leader turns its institution's result into one vector
    [w * delta (+ its share of the noise), w * loss, w, under-clip bit (+ noise share)]
with delta = its model minus the round's global model, w = n_k (FedAvg weights) or 1 under DP
(the bounded weights of DP-FedAvg), the delta clipped to the DP clip. With secure aggregation
the vector is encoded in fixed point, masked pairwise, and the root learns only the sum; without
it the root sums the vectors and adds the noise itself. The root turns the sum into the mean
update (divided by sum(w), or by the fixed q*K under DP) and hands it to the strategy.
"""

from __future__ import annotations

import numpy as np

from ..comm.agree import raise_together
from ..errors import UserError
from ..xp import to_host
from .dp import (
    adapt_clip,
    clip_update,
    epsilon,
    gaussian_noise,
    split_noise_stddev,
    update_noise_multiplier,
)
from .secagg import add_pairwise_mask, check_distinct, decode, encode, new_keypair, scale_bits

TAG_KEY, TAG_VECTOR = 21, 22
LOSS_CAP = 1e4  # losses are metrics: capped so that their fixed-point range is known
TAIL = 3  # w * loss, w, under-clip bit


def poisson_participants(count: int, q: float, seed: int, round_index: int) -> list[int]:
    """Return the institutions of a round under Poisson sampling (each alone with probability q).

    The draw is public (seeded) so every rank agrees; the privacy comes from the noise.
    """
    if q >= 1:
        return list(range(count))
    rng = np.random.default_rng([seed, round_index, 0x706F6973])
    return [k for k in range(count) if rng.random() < q]


def default_count_stddev(noise_multiplier: float, expected_sites: float) -> float:
    """Return the clip count's noise stddev when none is set: Andrew et al.'s q*K/20, raised to
    noise_multiplier for small federations, where q*K/20 would leave the updates no noise budget
    (it must exceed noise_multiplier / 2); the updates then keep z / sqrt(3/4). Zero without
    noise."""
    if noise_multiplier == 0:
        return 0.0
    return max(expected_sites / 20, noise_multiplier)


def dp_settings(fed_cfg: dict, institutions: int) -> dict | None:
    """Return the [federated.dp] settings a run uses (a new dict), or None without DP.

    Derived values are filled in here, never written back into the config: an adaptive run
    without clip_count_stddev gets Andrew et al.'s q*K/20. Raises UserError when the count's
    noise would leave none for the updates.
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
    return dp


def leader_vector(params, global_host, report, weight: float, dp: dict | None, clip: float):
    """Return this leader's float vector [w*delta, w*loss, w, bit] before noise and encoding."""
    delta = to_host(params).astype(np.float64) - global_host
    bit = 0.0
    if dp is not None:
        delta, norm = clip_update(delta, clip)
        bit = 1.0 if norm <= clip else 0.0
    loss = min(report.loss, LOSS_CAP)
    return np.concatenate([weight * delta, [weight * loss, weight, bit]])


def noise_stddevs(dp: dict | None, clip: float, parties: int) -> tuple[float, float]:
    """Return (stddev on the update sum, stddev on the clip count) for a round."""
    if dp is None:
        return 0.0, 0.0
    count_std = dp["clip_count_stddev"] if dp["adaptive"] else 0.0
    z_update = update_noise_multiplier(dp["noise_multiplier"], count_std)
    return z_update * clip, count_std


def private_aggregate(fed_cfg, dp, fed, params, global_host, report, chosen, rnd,
                      state) -> dict | None:
    """Collective over the world: aggregate privately; on the root return the sums, else None.

    dp: the run's DP settings (`dp_settings`) or None; report: this institution's SiteReport.
    Returns {"delta_sum", "loss_sum", "weight_sum", "under_clip", "bytes", "clip"} on the root.
    """
    clip = float(state.get("dp_clip", dp["clip"])) if (fed.is_root and dp) else 0.0
    clip = fed.world.bcast(clip, root=0)
    weight = 1.0 if dp else report.samples
    vector = None
    if fed.is_leader and fed.institution in chosen:
        vector = leader_vector(params, global_host, report, weight, dp, clip)
    if fed_cfg["secure_aggregation"]:
        sums = _secure_sum(fed_cfg, fed, vector, chosen, rnd, dp, clip, params.size)
    else:
        sums = _plain_sum(fed, vector, chosen, dp, clip, params.size)
    if sums is not None:
        sums["clip"] = clip
    return sums


def _plain_sum(fed, vector, chosen, dp, clip, size) -> dict | None:
    """Leaders send their vectors; the root sums them and adds the DP noise itself."""
    if fed.is_leader and not fed.is_root and vector is not None:
        fed.leaders.Send(vector, 0, TAG_VECTOR)
    if not fed.is_root:
        return None
    total, received = np.zeros(size + TAIL), 0
    for k in chosen:
        if k == fed.institution:
            total += vector
            continue
        buf = np.empty(size + TAIL)
        fed.leaders.Recv(buf, k, TAG_VECTOR)
        total += buf
        received += buf.nbytes
    update_std, count_std = noise_stddevs(dp, clip, 1)
    rng = np.random.default_rng()  # OS entropy: noise nobody can reproduce and subtract
    total[:size] += gaussian_noise(size, update_std, rng)
    total[-1] += gaussian_noise(1, count_std, rng)[0]
    return _sums(total, size, received)


NOISE_SIGMAS = 8  # the ring's range covers a leader's noise share to 8 standard deviations


def ring_scales(fed_cfg: dict, dp, parties: int, clip: float = 0.0) -> tuple[float, int, int]:
    """Return (update range, fraction bits of the update part, of the tail) for the ring.

    The update range is the declared federated.secure_range times the largest weight, plus,
    under DP, NOISE_SIGMAS standard deviations of a leader's noise share (public numbers).
    """
    bits = fed_cfg["secure_bits"]
    w_max = 1.0 if dp else float(fed_cfg["secure_max_samples"])
    update_std, _ = noise_stddevs(dp, clip, parties)
    bound = w_max * fed_cfg["secure_range"] + NOISE_SIGMAS * split_noise_stddev(update_std,
                                                                                parties)
    return bound, scale_bits(bound, parties, bits), scale_bits(w_max * LOSS_CAP, parties, bits)


def _masked_ring(fed_cfg, institution, vector, private, publics, rnd, dp, clip, size):
    """Return a leader's vector with its noise share, in fixed point, masked (or raise)."""
    bits = fed_cfg["secure_bits"]
    w_max = 1.0 if dp else float(fed_cfg["secure_max_samples"])
    bound, f_delta, f_tail = ring_scales(fed_cfg, dp, len(publics), clip)
    if vector[-2] > w_max:
        raise UserError(f"secure aggregation: institution {institution} has {vector[-2]:.0f} "
                        "samples, above federated.secure_max_samples; raise it")
    update_std, count_std = noise_stddevs(dp, clip, len(publics))
    rng = np.random.default_rng()  # OS entropy: the noise shares are secrets too
    vector[:size] += gaussian_noise(size, split_noise_stddev(update_std, len(publics)), rng)
    vector[-1] += gaussian_noise(1, split_noise_stddev(count_std, len(publics)), rng)[0]
    ring = np.concatenate([
        encode(vector[:size], bound, f_delta, bits, fed_cfg["secure_out_of_range"]),
        encode(vector[size:], w_max * LOSS_CAP, f_tail, bits, "clip")])
    return add_pairwise_mask(ring, institution, private, publics, rnd)


def _secure_sum(fed_cfg, fed, vector, chosen, rnd, dp, clip, size) -> dict | None:
    """Masked fixed-point vectors: the root relays fresh public keys and learns only the sum."""
    bits = fed_cfg["secure_bits"]
    private = public = None
    if vector is not None:
        private, public = new_keypair()  # fresh every round
    publics = _relay_keys(fed, public, chosen)
    ring = raise_together(fed.world, lambda: None if vector is None else _masked_ring(
        fed_cfg, fed.institution, vector, private, publics, rnd, dp, clip, size))
    if ring is not None and not fed.is_root:
        fed.leaders.Send(ring, 0, TAG_VECTOR)
    if not fed.is_root:
        return None
    total, received = np.zeros(size + TAIL, dtype=ring_dtype(bits)), len(publics) * 32
    for k in chosen:
        if k == fed.institution:
            total += ring
            continue
        buf = np.empty(size + TAIL, dtype=ring_dtype(bits))
        fed.leaders.Recv(buf, k, TAG_VECTOR)
        total += buf  # wraps modulo 2^bits: the masks cancel here
        received += buf.nbytes
    _, f_delta, f_tail = ring_scales(fed_cfg, dp, max(len(publics), 1), clip)
    values = np.concatenate([decode(total[:size], f_delta, bits),
                             decode(total[size:], f_tail, bits)])
    return _sums(values, size, received)


def ring_dtype(bits: int):
    return np.uint64 if bits == 64 else np.uint32


def _relay_keys(fed, public, chosen) -> dict[int, bytes]:
    """Leaders send public keys to the root, which checks them and returns them to all leaders.

    A reused key ends the round on every rank with the same message.
    """
    problem, publics = None, {}
    if fed.is_leader:
        if fed.is_root:
            publics = {fed.institution: public} if public is not None else {}
            for k in chosen:
                if k != fed.institution:
                    buf = bytearray(32)
                    fed.leaders.Recv(buf, k, TAG_KEY)
                    publics[k] = bytes(buf)
            try:
                check_distinct(publics)
            except UserError as err:
                problem = str(err)
        elif public is not None:
            fed.leaders.Send(public, 0, TAG_KEY)
    problem = fed.world.bcast(problem, root=0)
    if problem:
        raise UserError(problem)
    if fed.is_leader:
        publics = fed.leaders.bcast(publics, root=0)
    return publics


def _sums(total, size, received) -> dict:
    return {"delta_sum": total[:size], "loss_sum": float(total[size]),
            "weight_sum": float(total[size + 1]), "under_clip": float(total[size + 2]),
            "bytes": received}


def mean_update(sums: dict, dp: dict | None, institutions: int, q: float) -> np.ndarray:
    """Return the mean update: / sum of weights, or / q*K (DP's fixed denominator)."""
    denominator = q * institutions if dp else sums["weight_sum"]
    if denominator <= 0:
        return np.zeros_like(sums["delta_sum"])
    return sums["delta_sum"] / denominator


def next_clip(dp: dict, clip: float, sums: dict, institutions: int, q: float) -> float:
    """Adaptive clipping: move the clip toward the target quantile of the update norms."""
    if not dp["adaptive"]:
        return clip
    fraction_under = sums["under_clip"] / max(q * institutions, 1e-12)
    return adapt_clip(clip, fraction_under, dp["target_quantile"], dp["clip_lr"])


def round_epsilon(dp: dict, q: float, rounds: int) -> float:
    """Return (epsilon at dp.delta) after `rounds` rounds of Poisson-sampled Gaussian noise."""
    return epsilon(q, dp["noise_multiplier"], rounds, dp["delta"])


def apply_private_sums(strategy, dp, sums, global_params, institutions: int, q: float,
                       state: dict, hyper):
    """On the root: turn the private sums into (new global model, server state, record fields).

    strategy: a STRATEGIES function, applied to the one averaged model (global + mean update).
    The record fields: the institutions' mean loss, and under DP the clip used.
    """
    mean = mean_update(sums, dp, institutions, q)
    new, new_state = strategy(global_params, [(global_params + mean, 1.0, 1.0)], state, hyper)
    record = {}
    if sums["weight_sum"] > 0:
        record["loss"] = sums["loss_sum"] / sums["weight_sum"]
    if dp:
        new_state["dp_clip"] = np.array(next_clip(dp, sums["clip"], sums, institutions, q))
        record["clip"] = sums["clip"]
    return new, new_state, record
