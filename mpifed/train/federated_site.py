"""What one rank holds for its institution across a federation's rounds, and how it is opened:
its rows of the institution's training data, the model, the local step plan, the DP settings and
the private aggregator (checked on every rank before round 1)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from mpi4py import MPI

from ..comm.agree import raise_together
from ..comm.scalars import allreduce_int
from ..config import DPConfig
from ..data.shards import Shard
from ..errors import UserError
from ..faults import Byzantine
from ..federated.dp_settings import dp_settings
from ..federated.identity import load_identity
from ..federated.institutions import Federation
from ..federated.ledger import PrivacyLedger
from ..federated.masked_sum import ring_scales
from ..federated.private_aggregation import PrivateAggregator
from ..federated.rotated import RotatedCodec, make_codec
from ..nn.models import ModelSpec
from .federated_local import SentBytes
from .report import Reporter
from .setup import build_model, open_checked_shard, open_test_shard
from .timeline import Timeline


@dataclass
class Site:
    """What one rank holds for its institution across rounds."""

    shard: Shard  # this rank's training rows
    stream_comm: MPI.Comm  # the communicator that sharded them (seeds the shuffle)
    samples: int  # n_k: the institution's training rows
    spec: ModelSpec
    params: object  # the flat parameters (xp array), the global model at a round's start
    per_epoch: int  # steps per local epoch (the institution's smallest shard decides)
    local_steps: int  # local steps per round (FedNova's tau_k; not federated.tau)
    round_steps: int  # steps taken per round: local_steps, under secret sampling the padded count
    test: Shard | None  # this rank's rows of data.test
    dp: DPConfig | None  # the DP settings in use (dp_settings: derived values filled in)
    site_samples: list[int] | None  # on the root without secure aggregation: every n_k
    aggregator: PrivateAggregator | None = None  # with secure aggregation or DP
    ledger: PrivacyLedger | None = None  # on every leader under DP: every release
    log: Reporter | None = None  # on a leader under privacy: OUT/institution-K/metrics.jsonl
    sent: SentBytes | None = None  # on a leader under privacy: its bytes sent to other leaders
    byzantine: Byzantine | None = None  # on the leader MPIFED_FAULT=byzantine:K names (tests)
    personal: object = None  # federated_personal.Personal: what stays with the institution
    codec: RotatedCodec | None = None  # federated.compression = "rotated": updates in few bits
    timeline: Timeline | None = None  # run.timeline: this rank's part of its institution's trace


def site_data_path(template: str, institution: int) -> str:
    """Return institution k's file: the template with {institution} filled in."""
    try:
        return template.format(institution=institution)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"data.train: {template!r} is not a valid template ({err}); the only "
                        "field is {institution}") from None


def open_site_data(cfg, fed: Federation, dtype):
    """Open this rank's training rows; return (shard, stream_comm, institution samples, classes).

    With a template, institution k's ranks shard file k among themselves; without one, the file
    is sharded over the world, and an institution holds its ranks' rows.
    """
    data = cfg.data
    templated = "{institution}" in data.train
    if templated:
        path, comm = site_data_path(data.train, fed.institution), fed.site
    else:
        path, comm = data.train, fed.world
    shard, classes = raise_together(fed.world, lambda: open_checked_shard(
        comm, path, data.x, data.y, dtype, f"data.train (institution {fed.institution})"))
    samples = shard.info.samples if templated else allreduce_int(fed.site, len(shard), MPI.SUM)
    features = _allgather_ints(fed.world, shard.info.features)
    if len(set(features)) > 1:
        raise UserError(f"data.train: institutions' files have different feature counts "
                        f"({sorted(set(features))}); every site needs the same features")
    declared = {c for c in _allgather_ints(fed.world, shard.info.num_classes) if c >= 0}
    if len(declared) > 1:
        raise UserError(f"data.train: institutions' files declare different num_classes "
                        f"({sorted(declared)}); give every site the same num_classes attribute")
    return shard, comm, samples, max(_allgather_ints(fed.world, classes))


def _allgather_ints(comm, value: int | None) -> list[int]:
    """Every rank's integer (None as -1), in an int64 buffer: nothing pickled across
    institutions."""
    every = np.empty(comm.size, dtype=np.int64)
    comm.Allgather(np.array([-1 if value is None else value], dtype=np.int64), every)
    return every.tolist()


def local_step_count(fed_cfg, per_epoch: int) -> int:
    """Return this institution's local steps per round."""
    if fed_cfg.local_epochs is not None:
        return fed_cfg.local_epochs * per_epoch
    if fed_cfg.local_steps == "proportional":
        return per_epoch  # one local epoch: steps in proportion to the institution's data
    return fed_cfg.local_steps


def pads_rounds(fed_cfg, dp) -> bool:
    """Tell whether every institution takes one padded step count per round: under secret
    sampling (secure aggregation with DP) when the local step count follows the data
    (local_steps = "proportional" or local_epochs), which a round's length would reveal."""
    data_sized = fed_cfg.local_epochs is not None or fed_cfg.local_steps == "proportional"
    return bool(fed_cfg.secure_aggregation and dp is not None and data_sized)


def round_step_count(world, local_steps: int, padded: bool) -> int:
    """Return the steps every rank takes per round: its own count, or padded, the largest over
    the institutions (an int64 Allreduce over the world: nothing pickled)."""
    if not padded:
        return local_steps
    most = np.array([local_steps], dtype=np.int64)
    world.Allreduce(MPI.IN_PLACE, most, op=MPI.MAX)
    return int(most[0])


def open_site(cfg, fed: Federation, xp) -> Site:
    """Open this rank's data and test shard, build the model, plan the local steps."""
    fed_cfg, optim, world = cfg.federated, cfg.optim, fed.world
    dtype = np.dtype(cfg.model.dtype)
    shard, stream_comm, samples, classes = open_site_data(cfg, fed, dtype)
    spec, params = raise_together(world, lambda: build_model(
        cfg.model, cfg.run.seed, shard.info.input_shape, classes, xp, dtype, cfg.comm.shard,
        ranks=fed.site.size))
    smallest = allreduce_int(fed.site, len(shard), MPI.MIN)
    per_epoch = smallest // optim.batch_size
    raise_together(world, lambda: _check_batch(per_epoch, optim.batch_size, smallest, fed))
    pooled = cfg.data.test and "{institution}" not in cfg.data.test  # else: one per institution
    test = open_test_shard(world, cfg.data, spec, dtype) if pooled else None
    secure = fed_cfg.secure_aggregation
    # Under secure aggregation the root learns only sums, so not each institution's count.
    site_samples = None
    if fed.is_leader and not secure:
        every = np.empty(len(fed.sizes), dtype=np.int64) if fed.is_root else None
        fed.leaders.Gather(np.array([samples], dtype=np.int64), every, root=0)
        site_samples = every.tolist() if fed.is_root else None
    dp = raise_together(world, lambda: dp_settings(fed_cfg, len(fed.sizes)))
    identity = None
    if secure:
        raise_together(world, lambda: _check_senders(fed_cfg, dp, len(fed.sizes)))
        ring_scales(fed_cfg, dp, len(fed.sizes), dp.clip if dp else 0.0)  # fails on every rank
        if fed_cfg.keys:
            identity = raise_together(world, lambda: load_identity(
                fed_cfg.keys, fed.institution, len(fed.sizes), fed_cfg.keys_roster_sha256)
                if fed.is_leader else None)
    private = secure or dp is not None
    local_steps = local_step_count(fed_cfg, per_epoch)
    round_steps = round_step_count(world, local_steps, pads_rounds(fed_cfg, dp))
    sent = SentBytes(fed.leaders) if private and fed.is_leader else None
    counted = replace(fed, leaders=sent) if sent is not None else fed  # the same communicators
    codec = make_codec(fed_cfg, cfg.run.seed)
    return Site(shard=shard, stream_comm=stream_comm, samples=samples, spec=spec, params=params,
                per_epoch=per_epoch, local_steps=local_steps, round_steps=round_steps, test=test,
                dp=dp, site_samples=site_samples, sent=sent, codec=codec,
                aggregator=PrivateAggregator(fed_cfg, dp, counted, identity, codec=codec,
                                             seed=cfg.run.seed) if private else None)


def _check_senders(fed_cfg, dp, institutions: int) -> None:
    """Refuse, before round 1, secure aggregation with fewer leaders sending than
    federated.min_participants (under DP every leader sends every round)."""
    senders = institutions if dp else max(1, round(fed_cfg.fraction * institutions))
    if senders < fed_cfg.min_participants:
        raise UserError(f"federated.min_participants: secure aggregation with {senders} leaders "
                        f"sending per round is refused (at least {fed_cfg.min_participants}; "
                        "with two, the root subtracts its own vector and reads the other's); "
                        "add institutions or raise federated.fraction")


def _check_batch(per_epoch, batch, smallest, fed):
    if per_epoch == 0:
        raise UserError(f"optim.batch_size: {batch} rows per rank is more than the smallest shard "
                        f"of institution {fed.institution} ({smallest} rows); lower it")

