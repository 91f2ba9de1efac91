"""What each institution keeps to itself under federated.personalization, and its own test split.

FedBN and FedPer keep a part of the one model local: `shared_part` cuts it out of everything a
leader sends (the update to the root) and `broadcast_shared` moves only the shared part back, so
a rank's personal elements are never overwritten and never sent; the root's own institution
keeps its personal part the same way (the root's files hold the global model, whose personal
elements are the initial ones, `global_model`). Ditto keeps a second whole model per
institution (`Personal.model`), trained after each global step on the same batch with the
proximal term lambda (v - w) toward the round's global model w. `finetune` takes
federated.finetune_steps local steps on each institution's own model after the last round.

Personal parts live in OUT/institution-K/: checkpoints/personal-round-N.h5 beside the root's
checkpoint (a resume reads them back, bitwise) and personal.h5, the institution's model, at the
end. With data.test = "test-{institution}.h5", every institution evaluates the global and its
personal model on its own file each round (`evaluate_institution`); its leader writes them to
its own metrics.jsonl, and the root's record gets the mean and the worst over the institutions
unless secure aggregation or DP keeps every figure of one institution in its folder.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, replace

import h5py
import numpy as np

from ..comm.agree import raise_together
from ..data.atomic import atomic_path
from ..data.shards import Shard
from ..errors import UserError
from ..federated.exchange import broadcast_global
from ..federated.institutions import Federation
from ..federated.personal import SPLITS, check_split, local_summary, shared_mask
from ..nn.io import save_model
from ..optim import learning_rate, make_optimizer
from ..xp import get_array_module, to_host
from .evaluate import evaluate
from .federated_local import institution_folder
from .setup import open_test_shard

CHECKPOINT = "personal-round-{}.h5"


@dataclass
class Personal:
    """What one rank holds for its institution's personalisation (all ranks of an institution
    hold the same)."""

    mode: str  # federated.personalization
    mask: np.ndarray | None  # (n,) bool, True where shared: FedBN and FedPer only
    initial: np.ndarray | None  # (n,) host: the initial model (the global model's local part)
    model: object | None  # ditto: the personal model v (n,), an xp array
    local_test: Shard | None  # this rank's rows of its institution's data.test
    folder: str  # OUT/institution-K
    tuned: object | None = None  # after finetune: the institution's fine-tuned model

    @property
    def keeps_state(self) -> bool:
        """Whether there is anything personal to checkpoint during the rounds."""
        return self.mode != "none"


def open_personal(cfg, fed: Federation, spec, params, xp) -> Personal:
    """Build the split or the personal model and open this institution's test rows
    (collective over the world; a wrong split is refused on every rank)."""
    fed_cfg, dtype = cfg.federated, params.dtype
    mode = fed_cfg.personalization
    mask = shared_mask(spec, mode, fed_cfg.personal_layers, dtype)
    if mode in SPLITS:
        raise_together(fed.world, lambda: check_split(spec, mode, fed_cfg.personal_layers, mask))
    local_test = None
    if "{institution}" in cfg.data.test:
        path = cfg.data.test.format(institution=fed.institution)
        data = replace(cfg.data, test=path)
        local_test = raise_together(fed.world, lambda: open_test_shard(fed.site, data, spec,
                                                                       np.dtype(dtype)))
    return Personal(mode=mode, mask=mask,
                    initial=to_host(params).copy() if mask is not None else None,
                    model=params.copy() if mode == "ditto" else None, local_test=local_test,
                    folder=institution_folder(cfg.run.out, fed.institution))


def shared_part(personal: Personal, vector):
    """Return the elements of a host vector (n,) that leave the institution (a copy when cut)."""
    return vector if personal.mask is None else vector[personal.mask]


def put_shared(personal: Personal, params, values, xp) -> None:
    """Write the shared elements `values` into params in place; personal ones stay."""
    if personal.mask is None:
        params[...] = xp.asarray(values)
    else:
        params[xp.asarray(personal.mask)] = xp.asarray(values.astype(params.dtype))


def broadcast_shared(fed: Federation, personal: Personal, params, xp, site: bool = True) -> int:
    """Root -> every rank: the new global model's shared elements, in place; return the bytes
    the root sent. Nobody's personal elements travel (the root's included)."""
    if personal.mask is None:
        return broadcast_global(fed, params, site=site)
    buf = np.ascontiguousarray(to_host(params)[personal.mask])  # the root's is the one kept
    sent = broadcast_global(fed, buf, site=site)
    put_shared(personal, params, buf, xp)
    return sent


def global_model(personal: Personal, params):
    """Return the global model: params, with FedBN's or FedPer's local elements at their
    initial values (what a new institution would start from)."""
    if personal.mask is None:
        return params
    xp_mask = _like(params, ~personal.mask)
    out = params.copy()
    out[xp_mask] = _like(params, personal.initial)[xp_mask]
    return out


def personal_model(personal: Personal, params):
    """Return the model this institution serves: its fine-tuned one, Ditto's personal one, or
    its params (the global model's shared part with its own local part)."""
    if personal.tuned is not None:
        return personal.tuned
    return personal.model if personal.model is not None else params


def _like(params, host):
    """Return the host array `host` on params' device."""
    return get_array_module(params).asarray(host)


def ditto_step(personal: Personal, step_fn, batch, optimizer, lr: float, number: int,
               anchor, lam: float) -> float:
    """Take one step of the personal model v on `batch` with the proximal term lam (v - w),
    w = `anchor` (the round's global model); the step's buffer holds the global model again
    after it. Collective over the institution; return the loss."""
    params = step_fn.params
    kept = params.copy()
    params[...] = personal.model
    loss = step_fn(*batch, optimizer, lr, number, anchor, lam)
    personal.model[...] = params
    params[...] = kept
    return loss


# Checkpoints and the final model, in OUT/institution-K/ (written by the leader).

def personal_state(personal: Personal, params):
    """Return what a checkpoint keeps: the local elements (FedBN/FedPer) or v (Ditto)."""
    if personal.mask is not None:
        return to_host(params)[~personal.mask]
    return to_host(personal.model)


def save_personal_checkpoint(cfg, fed: Federation, personal: Personal, params,
                             rounds_done: int) -> None:
    """The leader writes OUT/institution-K/checkpoints/personal-round-N.h5 atomically and keeps
    the newest run.keep_checkpoints; collective over the world (a failure ends every rank)."""
    if not personal.keeps_state:
        return
    state = personal_state(personal, params)

    def write():
        if not fed.is_leader:
            return
        folder = os.path.join(personal.folder, "checkpoints")
        path = os.path.join(folder, CHECKPOINT.format(rounds_done))
        with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
            fh.create_dataset("personal", data=state)
            fh.attrs.update(round=rounds_done, personalization=personal.mode,
                            institution=fed.institution)
        for old in _checkpoints(folder)[:-cfg.run.keep_checkpoints]:
            os.remove(old)
    raise_together(fed.world, write)


def _checkpoints(folder: str) -> list[str]:
    """The personal checkpoints in `folder`, oldest first."""
    found = glob.glob(os.path.join(folder, CHECKPOINT.format("*")))
    return sorted(found, key=lambda p: int(re.findall(r"(\d+)\.h5$", p)[0]))


def resume_personal(cfg, fed: Federation, personal: Personal, params, rounds_done: int,
                    xp) -> None:
    """After resume_round: put this institution's personal parts of round `rounds_done` back
    (the leader reads them, its institution's ranks receive them); refuse a missing file."""
    if not personal.keeps_state or rounds_done == 0:
        return
    size = int((~personal.mask).sum()) if personal.mask is not None else params.size
    path = os.path.join(personal.folder, "checkpoints", CHECKPOINT.format(rounds_done))

    def read():
        if not fed.is_leader:
            return None
        if not os.path.exists(path):
            raise UserError(f"run.resume: the checkpoint after round {rounds_done} needs "
                            f"institution {fed.institution}'s personal parts in {path!r}, which "
                            "is missing; restore it, or start afresh in a new run.out")
        with h5py.File(path, "r") as fh:
            values, mode = np.asarray(fh["personal"]), fh.attrs["personalization"]
        mode = mode.decode() if isinstance(mode, bytes) else str(mode)
        if values.size != size or mode != personal.mode:
            raise UserError(f"run.resume: {path!r} holds another personalization's parts "
                            f"(not {personal.mode!r} with {size} elements); start afresh in a "
                            "new run.out")
        return values
    values = raise_together(fed.world, read)
    host = np.empty(size, dtype=params.dtype) if values is None else values.astype(params.dtype)
    fed.site.Bcast(host, root=0)
    if personal.mask is not None:
        params[_like(params, ~personal.mask)] = _like(params, host)
    else:
        personal.model[...] = _like(params, host)


def write_personal_model(fed: Federation, spec, personal: Personal, params) -> str | None:
    """The leader writes its institution's model to OUT/institution-K/personal.h5 (collective
    over the world)."""
    path = os.path.join(personal.folder, "personal.h5")
    model = personal_model(personal, params)
    raise_together(fed.world, lambda: save_model(path, spec, model) if fed.is_leader else None)
    return path


# Fine-tuning after the last round.

def finetune(cfg, fed: Federation, personal: Personal, params, step_fn, loader, first: int,
             xp) -> None:
    """Take federated.finetune_steps local steps from this institution's model on its own
    batches (the data stream continues), fresh optimizer, the last round's learning rate;
    keep the result in personal.tuned. The step's buffer holds the global model again after."""
    optim, fed_cfg = cfg.optim, cfg.federated
    steps = fed_cfg.finetune_steps
    if not steps:
        return
    lr = learning_rate(fed_cfg.rounds - 1, optim.lr, fed_cfg.rounds, optim.schedule,
                       optim.warmup, optim.step_size, optim.gamma)
    optimizer = make_optimizer(optim)
    kept = params.copy()
    params[...] = personal_model(personal, params)
    for t in range(steps):
        step_fn(*loader.get()[1:], optimizer, lr, first + t + 1)
    personal.tuned = params.copy()
    params[...] = kept


# Evaluation on each institution's own test split.

def evaluate_institution(fed: Federation, spec, personal: Personal, params, log, record: dict,
                         private: bool, xp, event: str = "evaluation") -> None:
    """Evaluate the global and the personal model on this institution's test rows; the leader
    writes them to its own log; unless `private`, the root's `record` gets the mean and worst
    over the institutions. Collective over the world."""
    if personal.local_test is None:
        return
    shared = global_model(personal, params)
    own = personal_model(personal, params)
    glob = evaluate(spec, shared, personal.local_test, fed.site, xp)
    mine = glob if own is params and personal.mask is None else evaluate(
        spec, own, personal.local_test, fed.site, xp)
    if log is not None:
        log.record(event=event, round=record.get("round"), test_samples=glob["samples"],
                   global_accuracy=glob["accuracy"], global_loss=glob["loss"],
                   personal_accuracy=mine["accuracy"], personal_loss=mine["loss"])
    if private or fed.leaders is None:
        return
    mine_at_root = np.empty((len(fed.sizes), 2)) if fed.is_root else None
    fed.leaders.Gather(np.array([mine["accuracy"], glob["accuracy"]]), mine_at_root, root=0)
    if fed.is_root:
        record.update(local_summary(mine_at_root[:, 0]))
        over_global = local_summary(mine_at_root[:, 1])
        record.update(local_accuracy_global_mean=over_global["local_accuracy_mean"],
                      local_accuracy_global_worst=over_global["local_accuracy_worst"])
