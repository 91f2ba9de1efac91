"""Federated rounds: institutions train data-parallel inside, the root aggregates their models.

    mpiexec -n 4 mpifed train fed.toml       # with a [federated] section

A round: the chosen institutions start from the global model, take their local steps (ring
all-reduce inside the institution; each rank's data stream continues across rounds), their
leaders send the models to the root, the root applies the strategy, and the new global model
flows back to every rank.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI

from ..comm.agree import raise_together
from ..xp import get_array_module, to_host
from ..errors import UserError
from ..nn.io import save_model
from ..optim import learning_rate, make_optimizer
from ..train.checkpoint import choose_checkpoint, save_checkpoint
from ..train.evaluate import evaluate, open_checked_shard, open_test_shard
from ..train.loop import batch_loader, build_model, prepare_out, stop_early
from ..train.report import Reporter
from ..train.signals import StopFlag
from ..train.step import DataParallelStep
from .exchange import META_FIELDS, broadcast_global, collect_at_root, send_to_root
from .layout import Federation, institution_sizes, make_federation, participants
from .privacy import update_noise_multiplier
from .private import (
    mean_update,
    next_clip,
    poisson_participants,
    private_aggregate,
    ring_scales,
    round_epsilon,
)
from .strategies import DEFAULT_SERVER_LR, STRATEGIES, ServerHyper


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
    return shard, comm, samples, fed.world.allreduce(classes, op=MPI.MAX)


def local_step_count(fed_cfg: dict, per_epoch: int) -> int:
    """Return this institution's local steps per round (tau_k)."""
    if fed_cfg["local_epochs"] is not None:
        return fed_cfg["local_epochs"] * per_epoch
    if fed_cfg["local_steps"] == "proportional":
        return per_epoch  # one local epoch: steps in proportion to the institution's data
    return fed_cfg["local_steps"]


def federate(cfg: dict, world, xp) -> dict:
    """Run the federation that `cfg` describes on `world`; return the summary (on every rank)."""
    fed_cfg, run = cfg["federated"], cfg["run"]
    fed = make_federation(world, institution_sizes(fed_cfg, world.size))
    site = _setup(cfg, fed, xp)
    out = prepare_out(cfg, world)
    first, site_steps, server_state = _resume(cfg, fed, site.params)
    reporter = Reporter(out, fed.is_root, fed_cfg["rounds"], run["progress"], append=first > 0)
    reporter.line(f"mpifed federated: {len(fed.sizes)} institutions of {fed.sizes} ranks, "
                  f"strategy {fed_cfg['strategy']}, {fed_cfg['rounds']} rounds, "
                  f"{site.spec.kind} {site.spec.sizes}"
                  + (f", resumed after round {first}" if first else ""))
    if first:
        reporter.record(event="resumed", round=first)
    step_fn = DataParallelStep(site.spec, site.params, fed.site, cfg["comm"]["allreduce"], xp,
                               cfg["comm"]["overlap"])
    loader = batch_loader(cfg, site.shard, site.per_epoch, site.stream_comm.rank, site_steps, xp)
    hyper = ServerHyper(fed_cfg["server_lr"] or DEFAULT_SERVER_LR.get(fed_cfg["strategy"], 1.0),
                        fed_cfg["beta1"], fed_cfg["beta2"], fed_cfg["tau"])
    start, last, stopped = time.perf_counter(), {}, ""
    try:
        with StopFlag() as flag:
            for rnd in range(first, fed_cfg["rounds"]):
                if over_budget(fed_cfg, rnd):  # the same decision on every rank, no message
                    reporter.record(event="budget", round=rnd, epsilon=last.get("epsilon"))
                    reporter.line(f"stopping before round {rnd + 1}: it would exceed "
                                  f"federated.dp.max_epsilon = {fed_cfg['dp']['max_epsilon']}")
                    break
                last, server_state, took_part = _round(cfg, fed, site, step_fn, loader, rnd,
                                                       hyper, server_state, xp)
                site_steps += site.tau if took_part else 0
                _report_round(reporter, last, site, fed, fed_cfg["rounds"], xp)
                stop = world.allreduce(flag.value, op=MPI.MAX) > 0
                every = run["checkpoint_every"]
                if stop or (every and (rnd + 1) % every == 0 and rnd + 1 < fed_cfg["rounds"]):
                    _write_checkpoint(cfg, fed, site.params, server_state, rnd + 1, site_steps)
                if stop:
                    stopped = flag.raised or "a signal on another rank"
                    break
    finally:
        loader.close()
        step_fn.close()
    step_fn.free()
    if stopped:
        return stop_early(cfg, world, reporter, rnd + 1, stopped)
    return _finish(cfg, fed, site, reporter, last, time.perf_counter() - start)


def over_budget(fed_cfg: dict, rnd: int) -> bool:
    """Tell whether round `rnd` (0-based) would take epsilon past federated.dp.max_epsilon."""
    dp = fed_cfg.get("dp")
    if not dp or not dp["max_epsilon"]:
        return False
    return round_epsilon(dp, fed_cfg["fraction"], rnd + 1) > dp["max_epsilon"]


def _setup(cfg: dict, fed: Federation, xp) -> SimpleNamespace:
    """Open this rank's data and test shard, build the model, plan the local steps."""
    optim, world = cfg["optim"], fed.world
    dtype = np.dtype(cfg["model"]["dtype"])
    shard, stream_comm, samples, classes = open_site_data(cfg, fed, dtype)
    spec, params = raise_together(world, lambda: build_model(cfg, shard.info.input_shape, classes,
                                                             xp, dtype))
    smallest = fed.site.allreduce(len(shard), op=MPI.MIN)
    per_epoch = smallest // optim["batch_size"]
    raise_together(world, lambda: _check_batch(per_epoch, optim["batch_size"], smallest, fed))
    test = None
    if cfg["data"]["test"]:
        test = open_test_shard(world, cfg, spec, dtype)
    secure = cfg["federated"]["secure_aggregation"]
    # Under secure aggregation the root learns only sums, so not each institution's count.
    site_samples = fed.leaders.gather(samples, root=0) if fed.is_leader and not secure else None
    dp = cfg["federated"].get("dp")
    if dp and dp["adaptive"] and dp["clip_count_stddev"] is None:
        dp["clip_count_stddev"] = cfg["federated"]["fraction"] * len(fed.sizes) / 20  # paper
    if secure:
        ring_scales(cfg["federated"], dp, len(fed.sizes))  # a ring too small fails on every rank
    if dp and dp["adaptive"]:
        try:  # the count's noise must leave some for the updates: check it on every rank
            update_noise_multiplier(dp["noise_multiplier"], dp["clip_count_stddev"])
        except ValueError as err:
            raise UserError(str(err)) from None
    return SimpleNamespace(shard=shard, stream_comm=stream_comm, samples=samples, spec=spec,
                           params=params, per_epoch=per_epoch, test=test,
                           tau=local_step_count(cfg["federated"], per_epoch),
                           site_samples=site_samples)


def _layout(fed: Federation) -> dict:
    return {"ranks": fed.world.size, "institution_sizes": fed.sizes}


def _resume(cfg: dict, fed: Federation, params) -> tuple[int, int, dict]:
    """Return (rounds done, this institution's local steps done, server state) from run.resume."""
    world = fed.world
    found = raise_together(world, lambda: choose_checkpoint(cfg, "round", _layout(fed))
                           if fed.is_root else None)
    found = world.bcast(found, root=0)
    if found is None:
        return 0, 0, {}
    xp = get_array_module(params)
    params[...] = xp.asarray(found["params"])
    state = dict(found["state"]) if fed.is_root else {}  # the server's state lives on the host
    counters = found["counters"]
    return int(counters["round"]), int(counters["site_steps"][fed.institution]), state


def _write_checkpoint(cfg, fed, params, server_state, rounds_done, site_steps) -> None:
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
                                 "sampling": "(seed, round)"}}, cfg, _layout(fed),
                        cfg["run"]["keep_checkpoints"])
    fed.world.Barrier()


def _report_round(reporter, record, site, fed, rounds, xp) -> None:
    if fed.is_root and "metas" in record:
        record["institutions"] = _institution_table(record.pop("metas"), site.site_samples)
    elif fed.is_root:  # private aggregation: who took part, nothing about any one of them
        chosen = record.pop("participants")
        record["institutions"] = [{"institution": k, "participated": k in chosen}
                                  for k in range(len(fed.sizes))]
    if site.test is not None:
        result = evaluate(site.spec, site.params, site.test, fed.world, xp)
        record.update(accuracy=result["accuracy"], test_loss=result["loss"],
                      test_samples=result["samples"])
    reporter.record(event="round", **record)
    reporter.line(_round_line(record, rounds))


def _finish(cfg, fed, site, reporter, last, seconds) -> dict:
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


def _round(cfg, fed, site, step_fn, loader, rnd, hyper, server_state, xp):
    """Run one round on every rank; return (record for rank 0, server state, took part)."""
    fed_cfg, optim = cfg["federated"], cfg["optim"]
    spec, params, tau = site.spec, site.params, site.tau
    t0 = time.perf_counter()
    comm_before = step_fn.comm_seconds
    dp = fed_cfg.get("dp")
    private = fed_cfg["secure_aggregation"] or dp is not None
    choose = poisson_participants if dp else participants  # DP's accountant assumes Poisson
    chosen = choose(len(fed.sizes), fed_cfg["fraction"], cfg["run"]["seed"], rnd)
    meta = np.zeros(len(META_FIELDS))
    meta[:2] = site.samples, tau
    keeps_global = fed.is_root or (private and fed.is_leader)
    global_params = to_host(params).astype(np.float64) if keeps_global else None  # round start
    if fed.institution in chosen:
        anchor = params.copy() if fed_cfg["strategy"] == "fedprox" else None
        optimizer = make_optimizer(optim)  # each round starts the local optimiser afresh
        lr = learning_rate(rnd, optim["lr"], fed_cfg["rounds"], optim["schedule"],
                           optim["warmup"], optim["step_size"], optim["gamma"])
        losses = [step_fn(*loader.get()[1:], optimizer, lr, rnd * tau + t + 1, anchor,
                          fed_cfg["mu"]) for t in range(tau)]
        meta[2] = float(np.mean(losses))
        if fed_cfg["evaluate_local"]:
            local = evaluate(spec, params, site.shard, fed.site, xp)  # its rows, its model
            meta[3:5] = local["loss"], local["accuracy"]
    t_exchange = time.perf_counter()
    to_root = from_root = 0
    record = {"round": rnd + 1}
    if private:
        sums = private_aggregate(cfg, fed, params, global_params, meta, chosen, rnd,
                                 server_state)
        if fed.is_root:
            server_state, to_root = _apply_private(cfg, fed, params, global_params, sums, rnd,
                                                   hyper, server_state, record, xp)
            record["participants"] = chosen
    elif fed.is_root:
        results, to_root = collect_at_root(fed, params, meta, chosen)
        new, server_state = STRATEGIES[fed_cfg["strategy"]](
            global_params.astype(params.dtype), [(p, m[0], m[1]) for p, m in results.values()],
            server_state, hyper)
        params[...] = xp.asarray(new)  # strategies run on the host, at the root only
        record["metas"] = {k: m for k, (_, m) in results.items()}
    elif fed.is_leader and fed.institution in chosen:
        send_to_root(fed, params, meta)
    from_root = broadcast_global(fed, params)
    now = time.perf_counter()
    record.update(bytes_to_root=to_root, bytes_from_root=from_root, round_seconds=now - t0,
                  exchange_seconds=now - t_exchange,
                  allreduce_seconds=step_fn.comm_seconds - comm_before)
    record["comm_fraction"] = (record["exchange_seconds"] + record["allreduce_seconds"]) / max(
        now - t0, 1e-9)
    return record, server_state, fed.institution in chosen


def _apply_private(cfg, fed, params, global_params, sums, rnd, hyper, state, record, xp):
    """On the root: turn the private sums into the new global model, the clip and epsilon."""
    fed_cfg, dp = cfg["federated"], cfg["federated"].get("dp")
    institutions, q = len(fed.sizes), fed_cfg["fraction"]
    mean = mean_update(sums, dp, institutions, q)
    new, new_state = STRATEGIES[fed_cfg["strategy"]](global_params, [(global_params + mean, 1.0,
                                                                       1.0)], state, hyper)
    params[...] = xp.asarray(new.astype(params.dtype))
    if sums["weight_sum"] > 0:
        record["loss"] = sums["loss_sum"] / sums["weight_sum"]  # the institutions' mean loss
    if dp:
        new_state["dp_clip"] = np.array(next_clip(dp, sums["clip"], sums, institutions, q))
        record.update(clip=sums["clip"], epsilon=round_epsilon(dp, q, rnd + 1))
    return new_state, sums["bytes"]


def _institution_table(metas: dict, site_samples: list[int]) -> list[dict]:
    """Per-institution entries of a round record (idle institutions marked as such)."""
    table = []
    for k, samples in enumerate(site_samples):
        entry = {"institution": k, "samples": int(samples), "participated": k in metas}
        if k in metas:
            m = metas[k]
            entry.update(steps=int(m[1]), loss=float(m[2]))
            if m[4] or m[3]:
                entry.update(local_loss=float(m[3]), local_accuracy=float(m[4]))
        table.append(entry)
    return table


def _round_line(record: dict, rounds: int) -> str:
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
