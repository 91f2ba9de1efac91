"""A federation's checkpoints: the root writes the global model, the server state and every
institution's local steps after a round; a resumed run reads them back on every rank."""

from __future__ import annotations

import numpy as np

from ..comm.agree import raise_together
from ..federated.institutions import Federation
from ..xp import get_array_module
from .checkpoint import choose_checkpoint, save_checkpoint


def _mpi_shape(fed: Federation) -> dict:
    """The MPI shape (ranks and institutions) a checkpoint is valid for."""
    return {"ranks": fed.world.size, "institution_sizes": fed.sizes}


def resume_round(cfg, fed: Federation, params) -> tuple[int, int, dict]:
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
        save_checkpoint(cfg.run.out, "round", rounds_done, params, server_state,
                        {"round": rounds_done, "site_steps": steps,
                         "rng": {"seed": cfg.run.seed,
                                 "permutation": "(seed, epoch, site rank)",
                                 "sampling": "(seed, round)"}}, cfg, _mpi_shape(fed),
                        cfg.run.keep_checkpoints)
    fed.world.Barrier()

