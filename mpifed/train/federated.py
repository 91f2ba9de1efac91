"""Federated rounds: institutions train data-parallel inside, the root aggregates their models.

    mpiexec -n 4 mpifed train fed.toml       # with a [federated] section

A round: the chosen institutions start from the global model, take their local steps (ring
all-reduce inside the institution; each rank's data stream continues across rounds), their
leaders send the models to the root, the root applies the strategy, and the new global model
flows back to every rank. The pure pieces (strategies, DP, secure summation, the institutions'
split, the exchange with the root) live in `mpifed.federated`; this module runs the rounds, and
the federation's other concerns sit beside it: opening a rank's site (`federated_site.py`), who
takes part (`federated_sampling.py`), the privacy budget (`federated_budget.py`), checkpoints
(`federated_checkpoint.py`), the rounds' reports (`federated_report.py`) and what stays with
each institution under federated.personalization, with its own test split
(`federated_personal.py`).
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np
from mpi4py import MPI

from .. import faults
from ..comm.quiet import quiet_barrier
from ..errors import UserError
from ..federated.exchange import SiteReport, collect_at_root, send_to_root
from ..federated.institutions import Federation, institution_sizes, make_federation
from ..federated.private_update import apply_private_sums
from ..federated.robust import check_institution_count
from ..federated.rotated import rounding_rng
from ..federated.strategies import STRATEGIES, ServerHyper
from ..federated.wire_bytes import update_bytes
from ..log import get_logger
from ..nn.io import save_model
from ..optim import learning_rate, make_optimizer
from ..xp import to_host
from .data_parallel import model_source
from .environment import institution_environment, run_environment
from .evaluate import evaluate
from .federated_budget import admit_round, open_ledger, record_release
from .federated_checkpoint import resume_round, write_round_checkpoint
from .federated_local import institution_folder, open_institution_log, open_institution_trace
from .federated_personal import (
    broadcast_shared,
    ditto_step,
    evaluate_institution,
    finetune,
    global_model,
    open_personal,
    put_shared,
    resume_personal,
    save_personal_checkpoint,
    shared_part,
    write_personal_model,
)
from .federated_report import report_round
from .federated_sampling import round_senders
from .federated_site import Site, open_site, pads_rounds
from .inputs import NO_INPUTS, call_back
from .setup import batch_loader, prepare_out, running, start_report, stop_early
from .step import make_step
from .timeline import trace_step

log = get_logger(__name__)


def run_federation(cfg, world, xp, inputs=NO_INPUTS, lock=None) -> dict:
    """Run the federation that `cfg` (a Config with [federated]) describes on `world`; return
    the summary (on every rank). inputs: mpifed.train.run's callbacks (called after each round
    with (round, this rank's record)); a federation takes no arrays or model object yet.
    lock: the RunLock that world rank 0 takes on run.out before writing there."""
    fed_cfg, run = cfg.federated, cfg.run
    sizes = institution_sizes(fed_cfg, world.size)
    check_institution_count(fed_cfg, max(1, round(fed_cfg.fraction * len(sizes))))
    byzantine = misbehaving(fed_cfg, len(sizes))  # every rank refuses a wrong one alike
    fed = make_federation(world, sizes)
    site = open_site(cfg, fed, xp)
    if byzantine is not None and fed.is_leader and fed.institution in byzantine.institutions:
        site.byzantine = replace(byzantine, institution=fed.institution, others=())  # its own
        log.warning("%s=%s: this leader sends institution %d's update tampered (%s) every "
                    "round, for a test of the robust strategies", faults.ENV, byzantine,
                    fed.institution, byzantine.mode)
    env = run_environment(cfg, world)  # no hosts under DP or secure aggregation
    out = prepare_out(cfg, world, env, lock)
    site.personal = open_personal(cfg, fed, site.spec, site.params, xp)
    first, site_steps, server_state = resume_round(cfg, fed, site.params)
    resume_personal(cfg, fed, site.personal, site.params, first, xp)
    reporter = start_report(
        run.progress, out, fed.is_root, fed_cfg.rounds, first,
        f"mpifed federated: {len(fed.sizes)} institutions of {fed.sizes} ranks, strategy "
        f"{fed_cfg.strategy}, {fed_cfg.rounds} rounds, {site.spec.kind} {site.spec.sizes}",
        "round")
    step_fn = make_step(site.spec, site.params, fed.site, cfg.comm, xp)
    if not step_fn.holds_whole_model:  # ZeRO-3: each rank keeps its chunk; the leader also
        site.params = site.params if fed.is_leader else None  # the whole model to exchange
    else:
        site.params = step_fn.params  # all-gathered after every step, whole on every rank
    loader = batch_loader(cfg.data, cfg.optim.batch_size, run.seed, site.shard, site.per_epoch,
                          site.stream_comm.rank, site_steps, xp)
    hyper = ServerHyper(fed_cfg.server_step, fed_cfg.beta1, fed_cfg.beta2, fed_cfg.tau,
                        fed_cfg.trim_fraction, fed_cfg.num_malicious, fed_cfg.num_selected,
                        fed_cfg.q)
    if site.dp is not None and fed.is_leader:  # every leader counts the releases itself
        site.ledger = open_ledger(out, fed)
    own_env = institution_environment(env, fed.site, fed.institution)  # its own hosts only
    own_folder = site.aggregator is not None or site.personal.local_test is not None
    site.log = open_institution_log(out, fed, own_folder, append=first > 0, env=own_env)
    site.timeline = open_institution_trace(run.timeline, out, fed)
    start, last, stopped = time.perf_counter(), {}, ""
    to_root = [0.0, 0.0]  # this run's bytes to the root: as sent, as they would be uncompressed
    with running(loader, step_fn) as flag:
        for rnd in range(first, fed_cfg.rounds):
            if not admit_round(cfg, site, fed, rnd):  # every leader decides for itself
                reporter.record(event="budget", round=rnd, epsilon=last.get("epsilon"))
                reporter.line(f"stopping before round {rnd + 1}: it would exceed "
                              f"federated.dp.max_epsilon = {site.dp.max_epsilon}")
                break
            last, server_state, drawn = run_round(cfg, fed, site, step_fn, loader, rnd,
                                                  hyper, server_state, xp)
            site_steps += drawn  # the data stream's position, as a checkpoint stores it
            evaluate_institution(fed, site.spec, site.personal, model_source(step_fn),
                                 site.log, last, site.aggregator is not None, xp)
            to_root[0] += last["bytes_to_root"]
            to_root[1] += last["bytes_to_root"] * last.get("compression_ratio", 1.0)
            report_round(reporter, last, site, fed, fed_cfg.rounds, xp,
                         global_model(site.personal, model_source(step_fn)))
            call_back(world, inputs.callbacks, rnd + 1, dict(last))
            faults.inject("round", rnd + 1, world.rank)
            stop = _any_flag(world, flag.value)
            every = run.checkpoint_every
            if stop or (every and (rnd + 1) % every == 0 and rnd + 1 < fed_cfg.rounds):
                save_personal_checkpoint(cfg, fed, site.personal, site.params, rnd + 1)
                write_round_checkpoint(cfg, fed, global_model(site.personal, site.params),
                                       server_state, rnd + 1, site_steps)
            if stop:
                stopped = flag.raised or "a signal on another rank"
                break
        if not stopped:  # the loader still runs: fine-tuning draws the next batches
            last = finish_personal(cfg, fed, site, step_fn, loader, last, xp)
    step_fn.free()
    site.timeline.write(fed.site, os.path.join(institution_folder(out, fed.institution),
                                               "timeline.json"), own_env)
    if site.log is not None:
        site.log.close()
    if stopped:
        return stop_early(run.out, world, reporter, rnd + 1, stopped)
    return finish_federation(cfg, fed, site, reporter, last, time.perf_counter() - start,
                             dict(env, compression_ratio=to_root[1] / to_root[0]
                                  if to_root[0] else 1.0))


def finish_personal(cfg, fed, site: Site, step_fn, loader, last: dict, xp) -> dict:
    """After the last round: fine-tune each institution's own model (federated.finetune_steps),
    evaluate it on the institution's test split and write OUT/institution-K/personal.h5;
    return the last record with the fine-tuned figures (root, outside privacy)."""
    fed_cfg, personal = cfg.federated, site.personal
    if personal.mode == "none" and not fed_cfg.finetune_steps:
        return last
    done = fed_cfg.rounds * site.local_steps
    finetune(cfg, fed, personal, site.params, step_fn, loader, done, xp)
    if fed_cfg.finetune_steps and personal.local_test is not None:
        last = dict(last)
        evaluate_institution(fed, site.spec, personal, site.params, site.log, last,
                             site.aggregator is not None, xp, event="finetune")
    write_personal_model(fed, site.spec, personal, site.params)
    return last


def misbehaving(fed_cfg, institutions: int):
    """Return the Byzantine institution MPIFED_FAULT names (None: none); refuse one outside the
    federation, or under secure aggregation or DP (their exchange does not pass `tampered`)."""
    try:
        byzantine = faults.byzantine()
    except ValueError as err:
        raise UserError(str(err)) from None
    if byzantine is None:
        return None
    if max(byzantine.institutions) >= institutions:
        raise UserError(f"{faults.ENV}={byzantine}: there is no institution "
                        f"{max(byzantine.institutions)} (the federation has {institutions}: 0 to "
                        f"{institutions - 1})")
    if fed_cfg.secure_aggregation or fed_cfg.dp is not None:
        raise UserError(f"{faults.ENV}={byzantine}: a byzantine institution tampers with the "
                        "plain exchange to the root; secure aggregation and DP send masked or "
                        "clipped sums instead; remove [federated.dp] and "
                        "federated.secure_aggregation, or the fault")
    return byzantine


def _any_flag(world, value: int) -> bool:
    """Tell whether any rank's flag is set (an int64 Allreduce, nothing pickled)."""
    flag = np.array([value], dtype=np.int64)
    world.Allreduce(MPI.IN_PLACE, flag, op=MPI.MAX)
    return bool(flag[0] > 0)


def run_round(cfg, fed, site: Site, step_fn, loader, rnd, hyper, server_state, xp):
    """Run one round on every rank; return (record for rank 0, server state, batches this
    institution drew from its data stream).

    Under secret sampling (secure aggregation with DP) an institution left out trains all the
    same and sends zeros: every institution takes `site.round_steps` steps and sends the same
    bytes every round, so neither the round's length nor its traffic says who took part.
    Under privacy each leader writes its own figures to OUT/institution-K/metrics.jsonl; the
    root's record keeps only what the aggregate reveals (`root_figures`).
    """
    fed_cfg, params = cfg.federated, site.params
    t0 = time.perf_counter()
    comm_before = step_fn.comm_seconds
    sent_before = site.sent.sent if site.sent is not None else 0
    private = site.aggregator is not None
    senders, takes_part = round_senders(cfg.federated, cfg.run.seed, fed, site, rnd)
    keeps_global = (fed.is_root or (private and fed.is_leader) or site.byzantine is not None
                    or (site.codec is not None and fed.is_leader))
    global_params = to_host(params).astype(np.float64) if keeps_global else None  # round start
    report = SiteReport(samples=site.samples, steps=site.local_steps)
    secret = fed_cfg.secure_aggregation and site.dp is not None
    release, t_prepare = {}, time.perf_counter()
    if private:  # clip, keys, masks and noise do not depend on the model: before training
        site.aggregator.prepare(senders, rnd, server_state,
                                params.size if params is not None else step_fn.n, params)
        if site.dp and fed.is_root:  # the ledger holds the release before any vector is sent
            release = record_release(site, fed, fed_cfg, rnd, senders)
    prepare_seconds = time.perf_counter() - t_prepare  # part of the exchange, done early
    trains = takes_part or secret  # left out by its secret draw: the same work, discarded
    if trains:
        try:
            report = local_training(fed_cfg, cfg.optim, fed, site, step_fn, loader, rnd, xp)
        except UserError as err:  # agreed inside this institution only (a diverged loss):
            err.collective = False  # the other institutions wait for it, so end them too
            raise
    t_exchange = time.perf_counter()
    to_root = from_root = plain_sent = 0
    record = {"round": rnd + 1}
    strategy = STRATEGIES[fed_cfg.strategy]
    if private:
        record.update(release)
        sums = site.aggregator(params if params is not None else _stand_in(step_fn),
                               global_params, report, senders, takes_part, rnd, server_state)
        if fed.is_root:
            new, server_state, fields = apply_private_sums(
                strategy, site.dp, sums, global_params, len(fed.sizes), fed_cfg.fraction,
                server_state, hyper)
            params[...] = xp.asarray(new.astype(params.dtype))
            record.update(fields)
            to_root = sums["bytes"]
            record["compression_ratio"] = compression_ratio(fed_cfg, site.dp, fed, senders,
                                                            params, to_root)
            if not secret:  # public samples only
                record["participants"] = senders
    else:
        quiet_barrier(fed.world)  # wait for the slowest institution without taking its core
        personal = site.personal  # FedBN/FedPer: only the shared part leaves the institution
        outgoing = params if personal.mask is None else shared_part(personal, to_host(params))
        start = None if global_params is None else shared_part(personal, global_params)
        if site.byzantine is not None and takes_part:  # a test's tampered update (faults.py)
            outgoing = faults.tampered(site.byzantine, start.astype(params.dtype),
                                       shared_part(personal, to_host(params)), rnd)
        if site.codec is not None and fed.is_leader:  # the update in few bits, not the model
            outgoing = encoded_update(site.codec, outgoing, start, rnd, cfg.run.seed,
                                      fed.institution, takes_part)
        if fed.is_root:
            results, to_root = collect_at_root(fed, outgoing, report, senders)
            if site.codec is not None:
                results = decoded_models(site.codec, results, start, params.dtype, rnd)
            new, server_state = strategy(
                start.astype(params.dtype),
                [(p, r.samples, r.steps, r.loss) for p, r in results.values()], server_state,
                hyper)
            put_shared(personal, params, new, xp)  # strategies run on the host, at the root
            record["reports"] = {k: r for k, (_, r) in results.items()}
            record["sent"] = {k: (outgoing.nbytes + 8 * SiteReport.wire_size()
                                  if k != fed.institution else 0) for k in results}
            record["compression_ratio"] = compression_ratio(fed_cfg, None, fed, senders,
                                                            params, to_root)
        elif fed.is_leader and takes_part:
            plain_sent = send_to_root(fed, outgoing, report)
    if params is not None:
        from_root = broadcast_shared(fed, site.personal, params, xp,
                                     site=step_fn.holds_whole_model)
    step_fn.scatter_from_leader(params)  # ZeRO-3: from the leader, each rank keeps its chunk
    now = time.perf_counter()
    timing = {"round_seconds": now - t0,
              "exchange_seconds": now - t_exchange + prepare_seconds,
              "allreduce_seconds": step_fn.comm_seconds - comm_before}
    timing["comm_fraction"] = (timing["exchange_seconds"] + timing["allreduce_seconds"]) / max(
        now - t0, 1e-9)
    if site.timeline is not None:  # its own trace: its training and its exchange of the round
        site.timeline.span("train", t_prepare + prepare_seconds, t_exchange, rnd + 1, unit="round")
        site.timeline.span("exchange", t_exchange, now, rnd + 1, unit="round")
    if site.log is not None:  # this leader's own figures, in its own folder
        mine = {"round": rnd + 1, "sampled": bool(takes_part),
                "steps": site.round_steps if trains else 0, "samples": int(site.samples),
                "bytes_sent": site.sent.sent - sent_before if site.sent else plain_sent}
        if fed_cfg.compression != "none" and mine["bytes_sent"] and not fed.is_root:
            sent, plain = update_bytes(fed_cfg, site.dp, global_params.size,
                                       params.dtype.itemsize, len(senders))
            mine["compression_ratio"] = (mine["bytes_sent"] + plain - sent) / mine["bytes_sent"]
        if takes_part:
            mine.update(trained_steps=int(report.steps), loss=float(report.loss))
            if fed_cfg.evaluate_local:
                mine.update(local_loss=float(report.local_loss),
                            local_accuracy=float(report.local_accuracy))
        site.log.record(event="round", **mine, **timing)
    record.update(bytes_to_root=to_root, bytes_from_root=from_root)
    record.update(root_figures(timing, private, secret))
    return record, server_state, site.round_steps if trains else 0


def encoded_update(codec, params, global_params, rnd: int, seed: int, institution: int,
                   takes_part: bool) -> np.ndarray:
    """Return a leader's update (its model minus the round's global model) as the codec's wire
    buffer; a leader left out of the round (only the root gets here) returns an empty buffer
    of that size, which `collect_at_root` reads as the size of the others'."""
    if not takes_part:
        return np.zeros(codec.wire_bytes(global_params.size), dtype=np.uint8)
    delta = to_host(params).astype(np.float64).reshape(-1) - global_params
    if not np.isfinite(np.linalg.norm(delta)):  # its range would be NaN: every value lost
        err = UserError("federated: this institution's update holds NaN or Inf (local "
                        "training diverged); lower optim.lr. Nothing was sent")
        err.collective = False  # the root waits for this leader: end every rank
        raise err
    return codec.encode(delta, rnd, rounding_rng(seed, rnd, institution))


def decoded_models(codec, results: dict, global_params, dtype, rnd: int) -> dict:
    """On the root: turn each institution's wire buffer back into its model, global + delta^,
    in the model's dtype (the strategies then see models, as without compression)."""
    models = {}
    for k, (wire, report) in results.items():
        delta, _ = codec.decode(wire, rnd, global_params.size)
        models[k] = ((global_params + delta).astype(dtype), report)
    return models


def compression_ratio(fed_cfg, dp, fed, senders, params, to_root: int) -> float:
    """Return the root's bytes received this round uncompressed over as received (>= 1; 1.0
    when nothing came): every sender but the root's own institution sent one update."""
    if not to_root:
        return 1.0
    sent, plain = update_bytes(fed_cfg, dp, params.size, params.dtype.itemsize, len(senders))
    others = sum(k != fed.institution for k in senders)
    return (to_root + others * (plain - sent)) / to_root


def root_figures(timing: dict, private: bool, secret: bool) -> dict:
    """Return the timing the root's record keeps: all of it in a plain run; under privacy no
    figure of the root's own institution (its all-reduce time, hence comm_fraction); under
    secret sampling no per-round timing at all (the round's length must not say who trained)."""
    if secret:
        return {}
    if private:
        return {k: timing[k] for k in ("round_seconds", "exchange_seconds")}
    return timing


def local_training(fed_cfg, optim, fed, site: Site, step_fn, loader, rnd: int,
                   xp) -> SiteReport:
    """Take this institution's local steps from the global model, the leader holding the
    result (ZeRO-3: gathered from the chunks); return its report.

    fed_cfg, optim: the FederatedConfig (strategy, rounds, mu) and the OptimConfig. Under
    secret sampling with a step count that follows the data (`pads_rounds`), the institution
    then takes `site.round_steps - site.local_steps` more steps on its next batches and the
    leader puts its model back as it was before them: every institution takes the same number
    of steps per round, and the padding changes no result."""
    report = SiteReport(samples=site.samples, steps=site.local_steps)
    anchor = step_fn.anchor() if fed_cfg.strategy == "fedprox" else None
    optimizer = make_optimizer(optim)  # each round starts the local optimiser afresh
    lr = learning_rate(rnd, optim.lr, fed_cfg.rounds, optim.schedule,
                       optim.warmup, optim.step_size, optim.gamma)
    steps = site.local_steps
    ditto = site.personal is not None and site.personal.model is not None
    round_start = step_fn.anchor() if ditto else None  # Ditto's w: the round's global model
    personal_optimizer = make_optimizer(optim) if ditto else None

    def step(t: int, padding: bool = False) -> float:
        number, t_data = rnd * steps + t + 1, time.perf_counter()
        batch = loader.get()[1:]
        t_compute, comm_before = time.perf_counter(), step_fn.comm_seconds
        loss = step_fn(*batch, optimizer, lr, number, anchor, fed_cfg.mu)
        trace_step(site.timeline, number, t_data, t_compute, step_fn, comm_before)
        if ditto and not padding:  # the personal model v, on the same batch
            ditto_step(site.personal, step_fn, batch, personal_optimizer, lr, number,
                       round_start, fed_cfg.ditto_lambda)
        return loss

    report.loss = float(np.mean([step(t) for t in range(steps)]))
    if fed_cfg.evaluate_local:
        local = evaluate(site.spec, model_source(step_fn), site.shard, fed.site, xp)  # its own
        report.local_loss, report.local_accuracy = local["loss"], local["accuracy"]
    step_fn.gather_to_leader(site.params)  # ZeRO-3: the leader's whole model, from the chunks
    if pads_rounds(fed_cfg, site.dp):
        # every institution copies and restores, padded or not (zero steps): the same work
        kept = site.params.copy() if site.params is not None else None  # ZeRO-3: the leader
        for t in range(steps, site.round_steps):
            step(t, padding=True)
        if kept is not None:  # the model of its own steps; the padding's is discarded
            site.params[...] = kept
    return report


def _stand_in(step_fn):
    """ZeRO-3, a rank other than the leader: the model's size and dtype, no memory (all the
    private aggregator reads there)."""
    return np.broadcast_to(np.zeros(1, dtype=step_fn.dtype), (step_fn.n,))


def finish_federation(cfg, fed: Federation, site: Site, reporter, last, seconds,
                      env=None) -> dict:
    """Write the model (root) and the summary (with `env`, run_environment's fields); free the
    institutions' communicators."""
    out = cfg.run.out
    if fed.is_root:
        save_model(os.path.join(out, "model.h5"), site.spec,
                   global_model(site.personal, site.params))
    summary = {"event": "summary", "rounds": last.get("round", 0), "seconds": seconds,
               "accuracy": last.get("accuracy"), "test_loss": last.get("test_loss")}
    for key in ("local_accuracy_mean", "local_accuracy_worst", "local_accuracy_global_mean",
                "local_accuracy_global_worst"):
        if key in last:  # every institution's own test split (fine-tuned, if it was)
            summary[key] = last[key]
    if "epsilon" in last:  # under DP without secure aggregation: the largest institution's
        summary["epsilon"] = last["epsilon"]
        summary["epsilon_unamplified"] = last["epsilon_unamplified"]
    summary.update(env or {})
    reporter.record(**summary)
    reporter.line(f"done: {summary['rounds']} rounds in {seconds:.2f} s; model in "
                  f"{os.path.join(out, 'model.h5')}")
    reporter.close()
    fed.world.Barrier()
    fed.free()
    return summary

