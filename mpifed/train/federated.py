"""Federated rounds: institutions train data-parallel inside, the root aggregates their models.

    mpiexec -n 4 mpifed train fed.toml       # with a [federated] section

A round: the chosen institutions start from the global model, take their local steps (ring
all-reduce inside the institution; each rank's data stream continues across rounds), their
leaders send the models to the root, the root applies the strategy, and the new global model
flows back to every rank. The pure pieces (strategies, DP, secure summation, the institutions'
split, the exchange with the root) live in `mpifed.federated`; this module wires them together.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
from mpi4py import MPI

from .. import faults
from ..comm.agree import raise_together
from ..comm.quiet import quiet_barrier
from ..data.shards import Shard
from ..errors import UserError
from ..federated.dp import secure_bernoulli
from ..federated.dp_settings import dp_settings
from ..federated.exchange import SiteReport, broadcast_global, collect_at_root, send_to_root
from ..federated.identity import load_identity
from ..federated.institutions import Federation, institution_sizes, make_federation, participants
from ..federated.ledger import PrivacyLedger, ledger_epsilon, release_entry
from ..federated.masked_sum import ring_scales
from ..federated.private_aggregation import PrivateAggregator
from ..federated.private_update import apply_private_sums
from ..federated.strategies import DEFAULT_SERVER_LR, STRATEGIES, ServerHyper
from ..nn.io import save_model
from ..nn.models import ModelSpec
from ..optim import learning_rate, make_optimizer
from ..xp import get_array_module, to_host
from .checkpoint import choose_checkpoint, save_checkpoint
from .data_parallel import model_source
from .evaluate import evaluate
from .setup import (
    batch_loader,
    build_model,
    open_checked_shard,
    open_test_shard,
    prepare_out,
    running,
    start_report,
    stop_early,
)
from .step import make_step


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
    test: Shard | None  # this rank's rows of data.test
    dp: dict | None  # the DP settings in use (dp_settings), None without DP
    site_samples: list[int] | None  # on the root without secure aggregation: every n_k
    aggregator: PrivateAggregator | None = None  # with secure aggregation or DP
    ledger: PrivacyLedger | None = None  # on the root under DP: every release


def site_data_path(template: str, institution: int) -> str:
    """Return institution k's file: the template with {institution} filled in."""
    try:
        return template.format(institution=institution)
    except (KeyError, IndexError, ValueError) as err:
        raise UserError(f"data.train: {template!r} is not a valid template ({err}); the only "
                        "field is {institution}") from None


def open_site_data(cfg: dict, fed: Federation, dtype):
    """Open this rank's training rows; return (shard, stream_comm, institution samples, classes).

    With a template, institution k's ranks shard file k among themselves; without one, the file
    is sharded over the world, and an institution holds its ranks' rows.
    """
    data = cfg["data"]
    templated = "{institution}" in data["train"]
    if templated:
        path, comm = site_data_path(data["train"], fed.institution), fed.site
    else:
        path, comm = data["train"], fed.world
    shard, classes = raise_together(fed.world, lambda: open_checked_shard(
        comm, path, data["x"], data["y"], dtype, f"data.train (institution {fed.institution})"))
    samples = shard.info.samples if templated else fed.site.allreduce(len(shard), op=MPI.SUM)
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


def local_step_count(fed_cfg: dict, per_epoch: int) -> int:
    """Return this institution's local steps per round."""
    if fed_cfg["local_epochs"] is not None:
        return fed_cfg["local_epochs"] * per_epoch
    if fed_cfg["local_steps"] == "proportional":
        return per_epoch  # one local epoch: steps in proportion to the institution's data
    return fed_cfg["local_steps"]


def run_federation(cfg: dict, world, xp) -> dict:
    """Run the federation that `cfg` describes on `world`; return the summary (on every rank)."""
    fed_cfg, run = cfg["federated"], cfg["run"]
    fed = make_federation(world, institution_sizes(fed_cfg, world.size))
    site = open_site(cfg, fed, xp)
    out = prepare_out(cfg, world)
    first, site_steps, server_state = resume_round(cfg, fed, site.params)
    reporter = start_report(
        cfg, out, fed.is_root, fed_cfg["rounds"], first,
        f"mpifed federated: {len(fed.sizes)} institutions of {fed.sizes} ranks, strategy "
        f"{fed_cfg['strategy']}, {fed_cfg['rounds']} rounds, {site.spec.kind} {site.spec.sizes}",
        "round")
    step_fn = make_step(site.spec, site.params, fed.site, cfg["comm"], xp)
    if step_fn.stage == "parameters":  # ZeRO-3: each rank keeps its chunk; the leader also
        site.params = site.params if fed.is_leader else None  # the whole model to exchange
    else:
        site.params = step_fn.params  # all-gathered after every step, whole on every rank
    loader = batch_loader(cfg, site.shard, site.per_epoch, site.stream_comm.rank, site_steps, xp)
    hyper = ServerHyper(fed_cfg["server_lr"] or DEFAULT_SERVER_LR.get(fed_cfg["strategy"], 1.0),
                        fed_cfg["beta1"], fed_cfg["beta2"], fed_cfg["tau"])
    if site.dp is not None and fed.is_root:
        site.ledger = PrivacyLedger(out)
    start, last, stopped = time.perf_counter(), {}, ""
    with running(loader, step_fn) as flag:
        for rnd in range(first, fed_cfg["rounds"]):
            if over_budget(site, fed, fed_cfg, rnd):  # the root decides for every rank
                reporter.record(event="budget", round=rnd, epsilon=last.get("epsilon"))
                reporter.line(f"stopping before round {rnd + 1}: it would exceed "
                              f"federated.dp.max_epsilon = {site.dp['max_epsilon']}")
                break
            last, server_state, advanced = run_round(cfg, fed, site, step_fn, loader, rnd,
                                                      hyper, server_state, xp)
            site_steps += site.local_steps if advanced else 0
            report_round(reporter, last, site, fed, fed_cfg["rounds"], xp,
                         model_source(step_fn))
            faults.inject("round", rnd + 1, world.rank)
            stop = _any_flag(world, flag.value)
            every = run["checkpoint_every"]
            if stop or (every and (rnd + 1) % every == 0 and rnd + 1 < fed_cfg["rounds"]):
                write_round_checkpoint(cfg, fed, site.params, server_state, rnd + 1,
                                       site_steps)
            if stop:
                stopped = flag.raised or "a signal on another rank"
                break
    step_fn.free()
    if stopped:
        return stop_early(cfg, world, reporter, rnd + 1, stopped)
    return finish_federation(cfg, fed, site, reporter, last, time.perf_counter() - start)


def _any_flag(world, value: int) -> bool:
    """Tell whether any rank's flag is set (an int64 Allreduce, nothing pickled)."""
    flag = np.array([value], dtype=np.int64)
    world.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    return bool(flag[0] > 0)


def over_budget(site: Site, fed: Federation, fed_cfg: dict, rnd: int) -> bool:
    """Tell whether round `rnd` (0-based) would take epsilon past federated.dp.max_epsilon,
    counting every release in the ledger (replayed rounds included). The root decides."""
    dp = site.dp
    if not dp or not dp["max_epsilon"]:
        return False
    verdict = np.zeros(1, dtype=np.int64)
    if fed.is_root:
        everyone = None if fed_cfg["secure_aggregation"] else list(range(len(fed.sizes)))
        next_one = release_entry(dp, rnd, fed_cfg["fraction"], everyone)  # the worst case
        eps, _ = ledger_epsilon(dp, [*site.ledger.entries, next_one], len(fed.sizes))
        verdict[0] = eps > dp["max_epsilon"]
    fed.world.Bcast(verdict, root=0)
    return bool(verdict[0])


def open_site(cfg: dict, fed: Federation, xp) -> Site:
    """Open this rank's data and test shard, build the model, plan the local steps."""
    fed_cfg, optim, world = cfg["federated"], cfg["optim"], fed.world
    dtype = np.dtype(cfg["model"]["dtype"])
    shard, stream_comm, samples, classes = open_site_data(cfg, fed, dtype)
    spec, params = raise_together(world, lambda: build_model(cfg, shard.info.input_shape, classes,
                                                             xp, dtype, ranks=fed.site.size))
    smallest = fed.site.allreduce(len(shard), op=MPI.MIN)
    per_epoch = smallest // optim["batch_size"]
    raise_together(world, lambda: _check_batch(per_epoch, optim["batch_size"], smallest, fed))
    test = open_test_shard(world, cfg, spec, dtype) if cfg["data"]["test"] else None
    secure = fed_cfg["secure_aggregation"]
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
        ring_scales(fed_cfg, dp, len(fed.sizes))  # a ring too small fails on every rank
        if fed_cfg["keys"]:
            identity = raise_together(world, lambda: load_identity(
                fed_cfg["keys"], fed.institution, len(fed.sizes)) if fed.is_leader else None)
    private = secure or dp is not None
    return Site(shard=shard, stream_comm=stream_comm, samples=samples, spec=spec, params=params,
                per_epoch=per_epoch, local_steps=local_step_count(fed_cfg, per_epoch), test=test,
                dp=dp, site_samples=site_samples,
                aggregator=PrivateAggregator(fed_cfg, dp, fed, identity) if private else None)


def _check_senders(fed_cfg: dict, dp, institutions: int) -> None:
    """Refuse, before round 1, secure aggregation with fewer leaders sending than
    federated.min_participants (under DP every leader sends every round)."""
    senders = institutions if dp else max(1, round(fed_cfg["fraction"] * institutions))
    if senders < fed_cfg["min_participants"]:
        raise UserError(f"federated.min_participants: secure aggregation with {senders} leaders "
                        f"sending per round is refused (at least {fed_cfg['min_participants']}; "
                        "with two, the root subtracts its own vector and reads the other's); "
                        "add institutions or raise federated.fraction")


def _mpi_shape(fed: Federation) -> dict:
    """The MPI shape (ranks and institutions) a checkpoint is valid for."""
    return {"ranks": fed.world.size, "institution_sizes": fed.sizes}


def resume_round(cfg: dict, fed: Federation, params) -> tuple[int, int, dict]:
    """Return (rounds done, this institution's local steps done, server state) from run.resume."""
    world = fed.world
    found = raise_together(world, lambda: choose_checkpoint(cfg, "round", _mpi_shape(fed))
                           if fed.is_root else None)
    head = np.zeros(2 + len(fed.sizes), dtype=np.int64)  # found, round, steps per institution
    if found is not None:
        head[:] = [1, found["counters"]["round"], *found["counters"]["site_steps"]]
    world.Bcast(head, root=0)  # numbers, never a pickle from the root
    if not head[0]:
        return 0, 0, {}
    host = np.empty(params.size, dtype=np.dtype(params.dtype))
    if found is not None:
        host[:] = np.asarray(found["params"]).ravel()
    world.Bcast(host, root=0)
    xp = get_array_module(params)
    params[...] = xp.asarray(host).reshape(params.shape)
    state = dict(found["state"]) if fed.is_root else {}  # the server's state lives on the host
    return int(head[1]), int(head[2 + fed.institution]), state


def write_round_checkpoint(cfg, fed, params, server_state, rounds_done, site_steps) -> None:
    """The root writes the checkpoint after `rounds_done` rounds; every rank waits for it."""
    per_rank = np.empty((fed.world.size, 2), dtype=np.int64) if fed.is_root else None
    fed.world.Gather(np.array([fed.institution, site_steps], dtype=np.int64), per_rank, root=0)
    if fed.is_root:
        steps = [0] * len(fed.sizes)
        for institution, count in per_rank.tolist():
            steps[institution] = count
        save_checkpoint(cfg["run"]["out"], "round", rounds_done, params, server_state,
                        {"round": rounds_done, "site_steps": steps,
                         "rng": {"seed": cfg["run"]["seed"],
                                 "permutation": "(seed, epoch, site rank)",
                                 "sampling": "(seed, round)"}}, cfg, _mpi_shape(fed),
                        cfg["run"]["keep_checkpoints"])
    fed.world.Barrier()


def report_round(reporter, record, site: Site, fed: Federation, rounds: int, xp,
                 model=None) -> None:
    """Evaluate the new global model where data.test is set; log the round (root)."""
    if fed.is_root and "reports" in record:
        record["institutions"] = institution_table(record.pop("reports"), site.site_samples)
    elif fed.is_root and "participants" in record:  # who took part, nothing of any one of them
        chosen = record.pop("participants")
        record["institutions"] = [{"institution": k, "participated": k in chosen}
                                  for k in range(len(fed.sizes))]
    if site.test is not None:  # model: ZeRO-3's per-layer gatherer, else site.params
        result = evaluate(site.spec, site.params if model is None else model, site.test,
                          fed.world, xp)
        record.update(accuracy=result["accuracy"], test_loss=result["loss"],
                      test_samples=result["samples"])
    reporter.record(event="round", **record)
    reporter.line(round_line(record, rounds))


def finish_federation(cfg, fed: Federation, site: Site, reporter, last, seconds) -> dict:
    """Write the model (root) and the summary; free the institutions' communicators."""
    out = cfg["run"]["out"]
    if fed.is_root:
        save_model(os.path.join(out, "model.h5"), site.spec, site.params)
    summary = {"event": "summary", "rounds": last.get("round", 0), "seconds": seconds,
               "accuracy": last.get("accuracy"), "test_loss": last.get("test_loss")}
    if "epsilon" in last:  # under DP without secure aggregation: the largest institution's
        summary["epsilon"] = last["epsilon"]
    reporter.record(**summary)
    reporter.line(f"done: {summary['rounds']} rounds in {seconds:.2f} s; model in "
                  f"{os.path.join(out, 'model.h5')}")
    reporter.close()
    fed.world.Barrier()
    fed.free()
    return summary


def _check_batch(per_epoch, batch, smallest, fed):
    if per_epoch == 0:
        raise UserError(f"optim.batch_size: {batch} rows per rank is more than the smallest shard "
                        f"of institution {fed.institution} ({smallest} rows); lower it")


def local_training(cfg, fed, site: Site, step_fn, loader, rnd: int, xp) -> SiteReport:
    """Take this institution's local steps from the global model; return its report."""
    fed_cfg, optim = cfg["federated"], cfg["optim"]
    report = SiteReport(samples=site.samples, steps=site.local_steps)
    anchor = step_fn.anchor() if fed_cfg["strategy"] == "fedprox" else None
    optimizer = make_optimizer(optim)  # each round starts the local optimiser afresh
    lr = learning_rate(rnd, optim["lr"], fed_cfg["rounds"], optim["schedule"],
                       optim["warmup"], optim["step_size"], optim["gamma"])
    steps = site.local_steps
    losses = [step_fn(*loader.get()[1:], optimizer, lr, rnd * steps + t + 1, anchor,
                      fed_cfg["mu"]) for t in range(steps)]
    report.loss = float(np.mean(losses))
    if fed_cfg["evaluate_local"]:
        local = evaluate(site.spec, model_source(step_fn), site.shard, fed.site, xp)  # its own
        report.local_loss, report.local_accuracy = local["loss"], local["accuracy"]
    return report


def round_senders(cfg, fed, site: Site, rnd: int) -> tuple[list[int], bool]:
    """Return (the institutions whose leaders send this round, whether this one trains).

    Under secure aggregation with DP every leader sends every round and draws its own
    participation from os.urandom (shared inside its institution only): the root learns neither
    who took part nor how many. Otherwise the sample is public (seeded by run.seed): Poisson
    under DP (accounted without amplification), a fixed-size draw without.
    """
    fed_cfg, count = cfg["federated"], len(fed.sizes)
    if fed_cfg["secure_aggregation"] and site.dp:
        drawn = np.array([secure_bernoulli(fed_cfg["fraction"]) if fed.is_leader else 0],
                         dtype=np.int64)
        fed.site.Bcast(drawn, root=0)  # inside the institution
        return list(range(count)), bool(drawn[0])
    choose = poisson_participants if site.dp else participants
    chosen = choose(count, fed_cfg["fraction"], cfg["run"]["seed"], rnd)
    return chosen, fed.institution in chosen


def poisson_participants(count: int, q: float, seed: int, round_index: int) -> list[int]:
    """Return a public Poisson sample (each institution alone with probability q), seeded: the
    root sees who sends anyway, so no amplification is claimed for it."""
    if q >= 1:
        return list(range(count))
    rng = np.random.default_rng([seed, round_index, 0x706F6973])
    return [k for k in range(count) if rng.random() < q]


def record_release(site: Site, fed: Federation, fed_cfg: dict, rnd: int, senders) -> dict:
    """On the root under DP: write the round's release to the ledger (before any vector is
    sent) and return the record's epsilon fields, counting every release in the ledger."""
    secure = fed_cfg["secure_aggregation"]
    site.ledger.append(release_entry(site.dp, rnd, fed_cfg["fraction"],
                                     None if secure else senders))
    eps, each = ledger_epsilon(site.dp, site.ledger.entries, len(fed.sizes))
    fields = {"epsilon": eps, "releases": len(site.ledger.entries)}
    if each is not None:
        fields["epsilon_per_institution"] = each
    return fields


def run_round(cfg, fed, site: Site, step_fn, loader, rnd, hyper, server_state, xp):
    """Run one round on every rank; return (record for rank 0, server state, whether this
    institution's data stream advanced)."""
    fed_cfg, params = cfg["federated"], site.params
    t0 = time.perf_counter()
    comm_before = step_fn.comm_seconds
    private = site.aggregator is not None
    senders, takes_part = round_senders(cfg, fed, site, rnd)
    keeps_global = fed.is_root or (private and fed.is_leader)
    global_params = to_host(params).astype(np.float64) if keeps_global else None  # round start
    report = SiteReport(samples=site.samples, steps=site.local_steps)
    secret = fed_cfg["secure_aggregation"] and site.dp is not None
    release, t_prepare = {}, time.perf_counter()
    if private:  # clip, keys, masks and noise do not depend on the model: before training
        site.aggregator.prepare(senders, rnd, server_state,
                                params.size if params is not None else step_fn.n)
        if site.dp and fed.is_root:  # the ledger holds the release before any vector is sent
            release = record_release(site, fed, fed_cfg, rnd, senders)
    prepare_seconds = time.perf_counter() - t_prepare  # part of the exchange, done early
    if takes_part:
        try:
            report = local_training(cfg, fed, site, step_fn, loader, rnd, xp)
        except UserError as err:  # agreed inside this institution only (a diverged loss):
            err.collective = False  # the other institutions wait for it, so end them too
            raise
        step_fn.gather_to_leader(params)  # ZeRO-3: the leader's whole model, from the chunks
    elif secret:  # the data position stays independent of the secret draw (checkpoints)
        for _ in range(site.local_steps):
            loader.get()
    t_exchange = time.perf_counter()
    to_root = from_root = 0
    record = {"round": rnd + 1}
    strategy = STRATEGIES[fed_cfg["strategy"]]
    if private:
        record.update(release)
        sums = site.aggregator(params if params is not None else _stand_in(step_fn),
                               global_params, report, senders, takes_part, rnd, server_state)
        if fed.is_root:
            new, server_state, fields = apply_private_sums(
                strategy, site.dp, sums, global_params, len(fed.sizes), fed_cfg["fraction"],
                server_state, hyper)
            params[...] = xp.asarray(new.astype(params.dtype))
            record.update(fields)
            to_root = sums["bytes"]
            if not (fed_cfg["secure_aggregation"] and site.dp):  # public samples only
                record["participants"] = senders
    else:
        quiet_barrier(fed.world)  # wait for the slowest institution without taking its core
        if fed.is_root:
            results, to_root = collect_at_root(fed, params, report, senders)
            new, server_state = strategy(
                global_params.astype(params.dtype),
                [(p, r.samples, r.steps) for p, r in results.values()], server_state, hyper)
            params[...] = xp.asarray(new)  # strategies run on the host, at the root only
            record["reports"] = {k: r for k, (_, r) in results.items()}
        elif fed.is_leader and takes_part:
            send_to_root(fed, params, report)
    if params is not None:
        from_root = broadcast_global(fed, params, site=step_fn.stage != "parameters")
    step_fn.scatter_from_leader(params)  # ZeRO-3: from the leader, each rank keeps its chunk
    now = time.perf_counter()
    record.update(bytes_to_root=to_root, bytes_from_root=from_root, round_seconds=now - t0,
                  exchange_seconds=now - t_exchange + prepare_seconds,
                  allreduce_seconds=step_fn.comm_seconds - comm_before)
    record["comm_fraction"] = (record["exchange_seconds"] + record["allreduce_seconds"]) / max(
        now - t0, 1e-9)
    return record, server_state, takes_part or secret


def _stand_in(step_fn):
    """ZeRO-3, a rank other than the leader: the model's size and dtype, no memory (all the
    private aggregator reads there)."""
    return np.broadcast_to(np.zeros(1, dtype=step_fn.dtype), (step_fn.n,))


def institution_table(reports: dict, site_samples: list[int]) -> list[dict]:
    """Per-institution entries of a round record (idle institutions marked as such)."""
    table = []
    for k, samples in enumerate(site_samples):
        entry = {"institution": k, "samples": int(samples), "participated": k in reports}
        if k in reports:
            r = reports[k]
            entry.update(steps=int(r.steps), loss=float(r.loss))
            if r.local_accuracy or r.local_loss:
                entry.update(local_loss=float(r.local_loss),
                             local_accuracy=float(r.local_accuracy))
        table.append(entry)
    return table


def round_line(record: dict, rounds: int) -> str:
    """The progress line of a round."""
    text = f"round {record['round']}/{rounds}"
    if "accuracy" in record:
        text += f" accuracy {record['accuracy']:.4f}"
    losses = [f"{e['loss']:.3f}" for e in record.get("institutions", []) if "loss" in e]
    if losses:
        text += f" local losses [{', '.join(losses)}]"
    elif "loss" in record:
        text += f" mean local loss {record['loss']:.3f}"
    if "epsilon" in record:
        text += f" epsilon {record['epsilon']:.3g}"
    return text + (f" {record['round_seconds']:.2f} s, to root {record['bytes_to_root']:,} B, "
                   f"comm {100 * record['comm_fraction']:.0f}%")
