"""Sharded checkpoints (ZeRO): each rank writes its chunk of the parameters and of the
optimiser's state, rank 0 a manifest; readable at any rank count.

    OUT/checkpoints/step-000000040.sharded/rank-00003.h5   params [lo, hi), state/<name> [lo, hi)
    OUT/checkpoints/step-000000040.sharded/manifest.json   n, bounds per rank, scalars, counters

The manifest is written last, after every rank's file is on disk (a barrier), atomically: a
folder without it was never finished and is skipped. At the same rank count each rank reads its
own file back (the same bits); at another, each rank reads the slices of the old files that
overlap its new chunk, so the parameters and the optimiser state are those the checkpoint held.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import h5py
import numpy as np

from ..data.atomic import atomic_path
from ..errors import UserError
from ..log import get_logger
from .checkpoint import (
    _dataset,
    _verified,
    checkpoint_dir,
    data_fingerprint,
    differences,
    list_checkpoints,
    set_aside,
)

log = get_logger(__name__)

_FOLDER = re.compile(r"step-(\d+)\.sharded$")


def _host(array):
    return np.asarray(array.get() if hasattr(array, "get") else array)


def folder_of(out: str, index: int) -> str:
    return os.path.join(checkpoint_dir(out), f"step-{index:09d}.sharded")


def save_sharded(cfg, comm, step_fn, optimizer, index: int, counters: dict) -> str:
    """Write this rank's part of checkpoint `index`; rank 0 adds the manifest (collective)."""
    out, keep = cfg.run.out, cfg.run.keep_checkpoints
    folder = folder_of(out, index)
    if comm.rank == 0:
        os.makedirs(folder, exist_ok=True)
    comm.Barrier()
    own = step_fn.n_own
    arrays = {k: v for k, v in optimizer.state().items() if np.ndim(v)}
    scalars = {k: (v.item() if hasattr(v, "item") else v)
               for k, v in optimizer.state().items() if not np.ndim(v)}
    path = os.path.join(folder, f"rank-{comm.rank:05d}.h5")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        _dataset(fh, "params", _host(step_fn.shard[:own]))  # with its SHA-256, checked on load
        group = fh.create_group("state")
        for name, value in arrays.items():
            _dataset(group, name, _host(value))
    comm.Barrier()  # every part is on disk before the manifest says so
    if comm.rank == 0:
        manifest = {"index": index, "ranks": comm.size, "n": step_fn.n,
                    "bounds": [[a, min(b, step_fn.n)] for a, b in step_fn.bounds],
                    "stage": step_fn.stage, "scalars": scalars, "counters": counters,
                    "config": cfg.to_dict(), "data": data_fingerprint(cfg)}
        with atomic_path(os.path.join(folder, "manifest.json")) as tmp, open(tmp, "w") as fh:
            json.dump(manifest, fh)
        for old in list_sharded(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    comm.Barrier()
    return folder


def list_sharded(out: str) -> list[str]:
    """Return the finished sharded checkpoint folders in run.out, oldest first."""
    folder = checkpoint_dir(out)
    found = [os.path.join(folder, name) for name in (os.listdir(folder)
                                                     if os.path.isdir(folder) else [])
             if _FOLDER.search(name) and os.path.exists(os.path.join(folder, name,
                                                                     "manifest.json"))]
    return sorted(found, key=lambda p: int(_FOLDER.search(p).group(1)))


def read_manifest(folder: str) -> dict:
    try:
        with open(os.path.join(folder, "manifest.json")) as fh:
            manifest = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"checkpoint {folder!r} cannot be read ({err})") from None
    manifest["path"] = folder
    return manifest


def choose_sharded(cfg) -> dict | None:
    """Return the manifest to resume from per run.resume, or None; refuse another run's."""
    resume, out = cfg.run.resume, cfg.run.out
    if resume == "never":
        moved = set_aside(out)  # a fresh run never mixes with another's
        if moved:
            log.info("run.resume = \"never\": moved the earlier checkpoints of %r to %r",
                     out, moved)
        return None
    if resume == "auto":
        found = list_sharded(out)
        if not found:
            refuse_other_kind(cfg, sharded=True)
            return None
        manifest = read_manifest(found[-1])
    elif os.path.isdir(resume):
        manifest = read_manifest(resume)
    else:
        raise UserError(f"run.resume: {resume!r} is neither \"auto\", \"never\" nor a sharded "
                        "checkpoint folder (OUT/checkpoints/step-N.sharded); use one of those")
    problems = differences(manifest["config"], cfg, {}, {})  # any rank count will do
    now = data_fingerprint(cfg)
    for path, then in (manifest.get("data") or {}).items():
        if path in now and then is not None and now[path] != then:
            problems.append(f"data file {path!r} changed since the checkpoint was written")
    if problems:
        raise UserError(f"run.resume: checkpoint {manifest['path']!r} is from a different run: "
                        + "; ".join(problems) + ". Use another run.out, or run.resume = \"never\"")
    return manifest


def refuse_other_kind(cfg, sharded: bool) -> None:
    """With run.resume = "auto" and no checkpoint of this run's kind in run.out: refuse when
    the folder holds the other kind (sharded step-N.sharded folders for a comm.shard = "none"
    run, or unsharded step-N.h5 files for a sharded one) rather than silently start afresh."""
    out, stage = cfg.run.out, cfg.comm.shard
    folder = checkpoint_dir(out)
    others = list_checkpoints(out, "step") if sharded else list_sharded(out)
    if not others:
        return
    newest = os.path.basename(others[-1])
    if sharded:
        then, kind = "none", "unsharded checkpoints (step-N.h5)"
    else:
        kind = "sharded checkpoints (step-N.sharded folders)"
        try:
            then = read_manifest(others[-1])["config"]["comm"]["shard"]
        except (UserError, KeyError, TypeError):
            then = "optimizer, gradients or parameters"
    raise UserError(f"run.resume: {folder!r} holds {kind}, newest {newest!r}, written with "
                    f"comm.shard = {then!r}, but this run has comm.shard = {stage!r} and "
                    f"cannot read them; set comm.shard = {then!r} to resume from them, or "
                    "run.resume = \"never\" to start afresh (they are moved aside), or use "
                    "another run.out")


def read_range(manifest: dict, name: str, lo: int, hi: int) -> np.ndarray:
    """Return elements [lo, hi) of `name` ("params" or "state/<key>"), from the old ranks'
    files that overlap them."""
    parts = []
    for rank, (a, b) in enumerate(manifest["bounds"]):
        x, y = max(a, lo), min(b, hi)
        if y > x:
            path = os.path.join(manifest["path"], f"rank-{rank:05d}.h5")
            try:
                with h5py.File(path, "r") as fh:
                    parts.append(_verified(fh[name])[x - a:y - a])
            except (OSError, KeyError, ValueError) as err:
                folder = manifest["path"]
                raise UserError(f"checkpoint {path!r} is damaged or unreadable ({err}); move "
                                f"{folder!r} aside to resume from the one before") from None
    return np.concatenate(parts) if parts else np.zeros(0)


def read_sharded(manifest: dict, step_fn, xp) -> tuple:
    """Read this rank's chunk of params and optimiser state (local); return (params, state)."""
    lo, own = step_fn.lo, step_fn.n_own
    if manifest["n"] != step_fn.n:
        raise UserError(f"run.resume: checkpoint {manifest['path']!r} holds {manifest['n']} "
                        f"parameters, the model has {step_fn.n}")
    values = xp.asarray(read_range(manifest, "params", lo, lo + own).astype(step_fn.dtype))
    with h5py.File(os.path.join(manifest["path"], "rank-00000.h5"), "r") as fh:
        names = list(fh["state"])
    state = {name: xp.asarray(read_range(manifest, f"state/{name}", lo, lo + own)
                              .astype(step_fn.dtype)) for name in names}
    state.update(manifest["scalars"])
    return values, state
