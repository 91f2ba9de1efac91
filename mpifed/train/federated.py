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
from ..data.shards import Shard
from ..errors import UserError
from ..federated.exchange import SiteReport, broadcast_global, collect_at_root, send_to_root
from ..federated.institutions import Federation, institution_sizes, make_federation, participants
from ..federated.private_aggregation import (
    apply_private_sums,
    dp_settings,
    poisson_participants,
    private_aggregate,
    ring_scales,
    round_epsilon,
)
from ..federated.strategies import DEFAULT_SERVER_LR, STRATEGIES, ServerHyper
from ..nn.io import save_model
from ..nn.models import ModelSpec
from ..optim import learning_rate, make_optimizer
from ..xp import get_array_module, to_host
from .checkpoint import choose_checkpoint, save_checkpoint
from .evaluate import evaluate
from .setup import (
    batch_loader,
    build_model,
    open_checked_shard,
    open_test_shard,
    prepare_out,
    start_report,
    stop_early,
)
from .signals import StopFlag
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
    features = fed.world.allgather(shard.info.features)
    if len(set(features)) > 1:
        raise UserError(f"data.train: institutions' files have different feature counts "
                        f"({sorted(set(features))}); every site needs the same features")
    declared = {c for c in fed.world.allgather(shard.info.num_classes) if c is not None}
    if len(declared) > 1:
        raise UserError(f"data.train: institutions' files declare different num_classes "
                        f"({sorted(declared)}); give every site the same num_classes attribute")
    return shard, comm, samples, fed.world.allreduce(classes, op=MPI.MAX)


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
    if cfg["comm"]["shard"] == "parameters":  # the same config on every rank: all raise
        raise UserError('comm.shard: "parameters" is not supported in a federation yet; use '
                        '"optimizer" or "gradients" (the institution\'s ranks shard, its leader '
                        'holds the whole model)')
    step_fn = make_step(site.spec, site.params, fed.site, cfg["comm"], xp)
    site.params = step_fn.params  # ZeRO-1/2: all-gathered after every step, whole on the leader
    loader = batch_loader(cfg, site.shard, site.per_epoch, site.stream_comm.rank, site_steps, xp)
    hyper = ServerHyper(fed_cfg["server_lr"] or DEFAULT_SERVER_LR.get(fed_cfg["strategy"], 1.0),
                        fed_cfg["beta1"], fed_cfg["beta2"], fed_cfg["tau"])
    start, last, stopped = time.perf_counter(), {}, ""
    try:
        with StopFlag() as flag:
            for rnd in range(first, fed_cfg["rounds"]):
                if over_budget(site.dp, fed_cfg["fraction"], rnd):  # same on every rank
                    reporter.record(event="budget", round=rnd, epsilon=last.get("epsilon"))
                    reporter.line(f"stopping before round {rnd + 1}: it would exceed "
                                  f"federated.dp.max_epsilon = {site.dp['max_epsilon']}")
                    break
                last, server_state, took_part = run_round(cfg, fed, site, step_fn, loader, rnd,
                                                          hyper, server_state, xp)
                site_steps += site.local_steps if took_part else 0
                report_round(reporter, last, site, fed, fed_cfg["rounds"], xp)
                faults.inject("round", rnd + 1, world.rank)
                stop = world.allreduce(flag.value, op=MPI.MAX) > 0
                every = run["checkpoint_every"]
                if stop or (every and (rnd + 1) % every == 0 and rnd + 1 < fed_cfg["rounds"]):
                    write_round_checkpoint(cfg, fed, site.params, server_state, rnd + 1,
                                           site_steps)
                if stop:
                    stopped = flag.raised or "a signal on another rank"
                    break
    finally:
        loader.close()
        step_fn.close()
    step_fn.free()
    if stopped:
        return stop_early(cfg, world, reporter, rnd + 1, stopped)
    return finish_federation(cfg, fed, site, reporter, last, time.perf_counter() - start)


def over_budget(dp: dict | None, fraction: float, rnd: int) -> bool:
    """Tell whether round `rnd` (0-based) would take epsilon past federated.dp.max_epsilon."""
    if not dp or not dp["max_epsilon"]:
        return False
    return round_epsilon(dp, fraction, rnd + 1) > dp["max_epsilon"]


def open_site(cfg: dict, fed: Federation, xp) -> Site:
    """Open this rank's data and test shard, build the model, plan the local steps."""
    fed_cfg, optim, world = cfg["federated"], cfg["optim"], fed.world
    dtype = np.dtype(cfg["model"]["dtype"])
    shard, stream_comm, samples, classes = open_site_data(cfg, fed, dtype)
    spec, params = raise_together(world, lambda: build_model(cfg, shard.info.input_shape, classes,
                                                             xp, dtype))
    smallest = fed.site.allreduce(len(shard), op=MPI.MIN)
    per_epoch = smallest // optim["batch_size"]
    raise_together(world, lambda: _check_batch(per_epoch, optim["batch_size"], smallest, fed))
    test = open_test_shard(world, cfg, spec, dtype) if cfg["data"]["test"] else None
    secure = fed_cfg["secure_aggregation"]
    # Under secure aggregation the root learns only sums, so not each institution's count.
    site_samples = fed.leaders.gather(samples, root=0) if fed.is_leader and not secure else None
    dp = raise_together(world, lambda: dp_settings(fed_cfg, len(fed.sizes)))
    if secure:
        ring_scales(fed_cfg, dp, len(fed.sizes))  # a ring too small fails on every rank
    return Site(shard=shard, stream_comm=stream_comm, samples=samples, spec=spec, params=params,
                per_epoch=per_epoch, local_steps=local_step_count(fed_cfg, per_epoch), test=test,
                dp=dp, site_samples=site_samples)


def _mpi_shape(fed: Federation) -> dict:
    """The MPI shape (ranks and institutions) a checkpoint is valid for."""
    return {"ranks": fed.world.size, "institution_sizes": fed.sizes}


def resume_round(cfg: dict, fed: Federation, params) -> tuple[int, int, dict]:
    """Return (rounds done, this institution's local steps done, server state) from run.resume."""
    world = fed.world
    found = raise_together(world, lambda: choose_checkpoint(cfg, "round", _mpi_shape(fed))
                           if fed.is_root else None)
    found = world.bcast(found, root=0)
    if found is None:
        return 0, 0, {}
    xp = get_array_module(params)
    params[...] = xp.asarray(found["params"])
    state = dict(found["state"]) if fed.is_root else {}  # the server's state lives on the host
    counters = found["counters"]
    return int(counters["round"]), int(counters["site_steps"][fed.institution]), state


def write_round_checkpoint(cfg, fed, params, server_state, rounds_done, site_steps) -> None:
    """The root writes the checkpoint after `rounds_done` rounds; every rank waits for it."""
    per_rank = fed.world.gather((fed.institution, site_steps), root=0)
    if fed.is_root:
        steps = [0] * len(fed.sizes)
        for institution, count in per_rank:
            steps[institution] = count
        save_checkpoint(cfg["run"]["out"], "round", rounds_done, params, server_state,
                        {"round": rounds_done, "site_steps": steps,
                         "rng": {"seed": cfg["run"]["seed"],
                                 "permutation": "(seed, epoch, site rank)",
                                 "sampling": "(seed, round)"}}, cfg, _mpi_shape(fed),
                        cfg["run"]["keep_checkpoints"])
    fed.world.Barrier()


def report_round(reporter, record, site: Site, fed: Federation, rounds: int, xp) -> None:
    """Evaluate the new global model where data.test is set; log the round (root)."""
    if fed.is_root and "reports" in record:
        record["institutions"] = institution_table(record.pop("reports"), site.site_samples)
    elif fed.is_root:  # private aggregation: who took part, nothing about any one of them
        chosen = record.pop("participants")
        record["institutions"] = [{"institution": k, "participated": k in chosen}
                                  for k in range(len(fed.sizes))]
    if site.test is not None:
        result = evaluate(site.spec, site.params, site.test, fed.world, xp)
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
    if "epsilon" in last:
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
    anchor = site.params.copy() if fed_cfg["strategy"] == "fedprox" else None
    optimizer = make_optimizer(optim)  # each round starts the local optimiser afresh
    lr = learning_rate(rnd, optim["lr"], fed_cfg["rounds"], optim["schedule"],
                       optim["warmup"], optim["step_size"], optim["gamma"])
    steps = site.local_steps
    losses = [step_fn(*loader.get()[1:], optimizer, lr, rnd * steps + t + 1, anchor,
                      fed_cfg["mu"]) for t in range(steps)]
    report.loss = float(np.mean(losses))
    if fed_cfg["evaluate_local"]:
        local = evaluate(site.spec, site.params, site.shard, fed.site, xp)  # its rows, its model
        report.local_loss, report.local_accuracy = local["loss"], local["accuracy"]
    return report


def run_round(cfg, fed, site: Site, step_fn, loader, rnd, hyper, server_state, xp):
    """Run one round on every rank; return (record for rank 0, server state, took part)."""
    fed_cfg, params = cfg["federated"], site.params
    t0 = time.perf_counter()
    comm_before = step_fn.comm_seconds
    private = fed_cfg["secure_aggregation"] or site.dp is not None
    choose = poisson_participants if site.dp else participants  # DP's accountant assumes Poisson
    chosen = choose(len(fed.sizes), fed_cfg["fraction"], cfg["run"]["seed"], rnd)
    keeps_global = fed.is_root or (private and fed.is_leader)
    global_params = to_host(params).astype(np.float64) if keeps_global else None  # round start
    report = SiteReport(samples=site.samples, steps=site.local_steps)
    if fed.institution in chosen:
        report = local_training(cfg, fed, site, step_fn, loader, rnd, xp)
    t_exchange = time.perf_counter()
    to_root = from_root = 0
    record = {"round": rnd + 1}
    strategy = STRATEGIES[fed_cfg["strategy"]]
    if private:
        sums = private_aggregate(fed_cfg, site.dp, fed, params, global_params, report, chosen,
                                 rnd, server_state)
        if fed.is_root:
            new, server_state, fields = apply_private_sums(
                strategy, site.dp, sums, global_params, len(fed.sizes), fed_cfg["fraction"],
                server_state, hyper)
            params[...] = xp.asarray(new.astype(params.dtype))
            record.update(fields)
            if site.dp:
                record["epsilon"] = round_epsilon(site.dp, fed_cfg["fraction"], rnd + 1)
            to_root = sums["bytes"]
            record["participants"] = chosen
    elif fed.is_root:
        results, to_root = collect_at_root(fed, params, report, chosen)
        new, server_state = strategy(
            global_params.astype(params.dtype),
            [(p, r.samples, r.steps) for p, r in results.values()], server_state, hyper)
        params[...] = xp.asarray(new)  # strategies run on the host, at the root only
        record["reports"] = {k: r for k, (_, r) in results.items()}
    elif fed.is_leader and fed.institution in chosen:
        send_to_root(fed, params, report)
    from_root = broadcast_global(fed, params)
    now = time.perf_counter()
    record.update(bytes_to_root=to_root, bytes_from_root=from_root, round_seconds=now - t0,
                  exchange_seconds=now - t_exchange,
                  allreduce_seconds=step_fn.comm_seconds - comm_before)
    record["comm_fraction"] = (record["exchange_seconds"] + record["allreduce_seconds"]) / max(
        now - t0, 1e-9)
    return record, server_state, fed.institution in chosen


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
