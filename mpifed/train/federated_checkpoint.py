"""A federation's checkpoints: the root writes the global model, the server state, every
institution's local steps and, under DP, how many releases the privacy ledger held and the
SHA-256 of those lines after a round; a resumed run reads them back on every rank, and refuses
a ledger that has lost releases since (that would reset the privacy budget)."""

from __future__ import annotations

import numpy as np

from ..comm.agree import raise_together
from ..errors import UserError
from ..federated.institutions import Federation
from ..federated.ledger import PrivacyLedger
from ..xp import get_array_module
from .checkpoint import choose_checkpoint, save_checkpoint
from .federated_budget import open_ledger


def _mpi_shape(fed: Federation) -> dict:
    """The MPI shape (ranks and institutions) a checkpoint is valid for."""
    return {"ranks": fed.world.size, "institution_sizes": fed.sizes}


def resume_round(cfg, fed: Federation, params) -> tuple[int, int, dict]:
    """Return (rounds done, this institution's local steps done, server state) from run.resume."""
    world = fed.world
    found = raise_together(world, lambda: choose_checkpoint(cfg, "round", _mpi_shape(fed))
                           if fed.is_root else None)
    # found, round, the ledger's releases (-1: not recorded), steps per institution
    head = np.zeros(3 + len(fed.sizes), dtype=np.int64)
    if found is not None:
        counters = found["counters"]
        head[:] = [1, counters["round"], counters.get("ledger_releases", -1),
                   *counters["site_steps"]]
    world.Bcast(head, root=0)  # numbers, never a pickle from the root
    if not head[0]:
        return 0, 0, {}
    if cfg.federated.dp is not None and head[2] >= 0:
        want = found["counters"].get("ledger_sha256") if found is not None else None
        raise_together(world, lambda: _check_ledger(cfg, fed, int(head[1]), int(head[2]), want)
                       if fed.is_leader else None)
    host = np.empty(params.size, dtype=np.dtype(params.dtype))
    if found is not None:
        host[:] = np.asarray(found["params"]).ravel()
    world.Bcast(host, root=0)
    xp = get_array_module(params)
    params[...] = xp.asarray(host).reshape(params.shape)
    state = dict(found["state"]) if fed.is_root else {}  # the server's state lives on the host
    return int(head[1]), int(head[3 + fed.institution]), state


def _check_ledger(cfg, fed: Federation, rounds: int, releases: int, want: str | None) -> None:
    """Refuse to resume when this leader's ledger holds fewer releases than the checkpoint
    counted, or (on the root, `want` given) when its first ones are not the lines the
    checkpoint hashed."""
    ledger = open_ledger(cfg.run.out, fed)
    what = f"checkpoint after round {rounds}"
    held = len(ledger.entries)
    if held < releases:
        raise UserError(f"run.resume: the privacy ledger {ledger.path!r} holds {held} "
                        f"releases, but the {what} was written after {releases}; releases "
                        "were lost, which would reset the privacy budget. Restore the ledger "
                        "file, or start afresh in a new run.out")
    if want is not None and ledger.prefix_sha256(releases) != want:
        raise UserError(f"run.resume: the first {releases} releases of the privacy ledger "
                        f"{ledger.path!r} ({held} in all) are not the {releases} the {what} "
                        "recorded (their SHA-256 differs): the ledger was edited or replaced. "
                        "Restore the ledger file, or start afresh in a new run.out")


def write_round_checkpoint(cfg, fed, params, server_state, rounds_done, site_steps) -> None:
    """The root writes the checkpoint after `rounds_done` rounds; every rank waits for it."""
    per_rank = np.empty((fed.world.size, 2), dtype=np.int64) if fed.is_root else None
    fed.world.Gather(np.array([fed.institution, site_steps], dtype=np.int64), per_rank, root=0)
    if fed.is_root:
        steps = [0] * len(fed.sizes)
        for institution, count in per_rank.tolist():
            steps[institution] = count
        counters = {"round": rounds_done, "site_steps": steps,
                    "rng": {"seed": cfg.run.seed, "permutation": "(seed, epoch, site rank)",
                            "sampling": "(seed, round)"}}
        if cfg.federated.dp is not None:  # the ledger as it stands, read back from the file
            ledger = PrivacyLedger(cfg.run.out)
            counters.update(ledger_releases=len(ledger.entries),
                            ledger_sha256=ledger.prefix_sha256(len(ledger.entries)))
        save_checkpoint(cfg.run.out, "round", rounds_done, params, server_state, counters, cfg,
                        _mpi_shape(fed), cfg.run.keep_checkpoints)
    fed.world.Barrier()

