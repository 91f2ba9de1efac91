"""Checkpoints: everything a run needs to continue to the same bits, written so that a crash at
any moment leaves the previous checkpoint intact.

A checkpoint is OUT/checkpoints/<kind>-<index>.h5 (kind "step" or "round"): the parameters, the
optimiser's (or the server's) state, the counters that place every rank's data stream, the
resolved config and the MPI layout. Randomness in mpifed is derived from (seed, epoch, rank) and
(seed, round), so the seed in the config is the whole RNG state. Files are written to a temporary
name, fsynced and renamed; the newest `keep` are kept.
"""

from __future__ import annotations

import glob
import json
import os
import re

import h5py
import numpy as np

from ..data.atomic import atomic_path
from ..errors import UserError

# run.resume: one of these words, or the path of a checkpoint file.
RESUME_MODES = ("auto", "never")

# Keys that may change between a run and its resumption: they change how long it runs or what
# it reports, never the bits of what it computes.
RESUMABLE_CHANGES = {
    ("optim", "epochs"), ("optim", "steps"), ("federated", "rounds"), ("data", "test"),
    ("run", "log_every"), ("run", "eval_every"), ("run", "progress"),
    ("run", "checkpoint_every"), ("run", "resume"), ("run", "keep_checkpoints"),
    ("run", "timeline"),
}


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def save_checkpoint(out: str, kind: str, index: int, params, state: dict, counters: dict,
                    cfg: dict, mpi_shape: dict, keep: int) -> str:
    """Write checkpoint `index` atomically and prune to the newest `keep`; return its path.

    state: name -> array (optimiser or server state); counters: name -> int or list of ints.
    """
    path = os.path.join(checkpoint_dir(out), f"{kind}-{index:09d}.h5")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        fh.create_dataset("params", data=_host(params))
        group = fh.create_group("state")
        for name, value in state.items():
            group.create_dataset(name, data=_host(value))
        fh.attrs["kind"], fh.attrs["index"] = kind, index
        fh.attrs["counters"] = json.dumps(counters)
        fh.attrs["config"] = json.dumps(cfg)
        fh.attrs["layout"] = json.dumps(mpi_shape)  # the file keeps its attribute name
        fh.attrs["complete"] = True  # last: a file without it was never finished
    for old in list_checkpoints(out, kind)[:-keep]:
        os.remove(old)
    for stale in glob.glob(os.path.join(checkpoint_dir(out), f".{kind}-*.h5.tmp-*")):
        if not stale.endswith(f".tmp-{os.getpid()}"):
            os.remove(stale)  # a write that a killed run never finished
    return path


def _host(array):
    return np.asarray(array.get() if hasattr(array, "get") else array)


def list_checkpoints(out: str, kind: str) -> list[str]:
    """Return the checkpoint files of `kind` in run.out, oldest first."""
    pattern = re.compile(rf"{kind}-(\d+)\.h5$")
    found = [p for p in glob.glob(os.path.join(checkpoint_dir(out), f"{kind}-*.h5"))
             if pattern.search(p)]
    return sorted(found, key=lambda p: int(pattern.search(p).group(1)))


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint; raise UserError if it is unreadable or incomplete."""
    try:
        with h5py.File(path, "r") as fh:
            if not fh.attrs.get("complete", False):
                raise UserError(f"checkpoint {path!r} is incomplete")
            return {
                "path": path, "kind": str(fh.attrs["kind"]), "index": int(fh.attrs["index"]),
                "params": fh["params"][...],
                "state": {name: fh["state"][name][()] for name in fh["state"]},
                "counters": json.loads(fh.attrs["counters"]),
                "config": json.loads(fh.attrs["config"]),
                "layout": json.loads(fh.attrs["layout"]),
            }
    except (OSError, KeyError) as err:
        raise UserError(f"checkpoint {path!r} cannot be read ({err})") from None


def newest_valid(out: str, kind: str) -> dict | None:
    """Return the newest checkpoint of `kind` that reads back complete, or None."""
    for path in reversed(list_checkpoints(out, kind)):
        try:
            return load_checkpoint(path)
        except UserError:
            continue  # a damaged newest file falls back to the one before it
    return None


def differences(saved_cfg: dict, cfg: dict, saved_shape: dict, mpi_shape: dict) -> list[str]:
    """Return what differs between a checkpoint's run and this one, in words (empty: resumable)."""
    problems = []
    if saved_shape != mpi_shape:
        problems.append(f"MPI layout {saved_shape} != {mpi_shape}")
    sections = set(saved_cfg) | set(cfg)
    for section in sorted(sections):
        old, new = saved_cfg.get(section) or {}, cfg.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if (section, key) in RESUMABLE_CHANGES:
                continue
            if old.get(key) != new.get(key):
                problems.append(f"{section}.{key}: {old.get(key)!r} then, {new.get(key)!r} now")
    return problems


def choose_checkpoint(cfg: dict, kind: str, mpi_shape: dict) -> dict | None:
    """Return the checkpoint to resume from per run.resume ("auto", "never" or a path), or None.

    A checkpoint from another layout or config is refused, naming what differs.
    """
    resume = cfg["run"]["resume"]
    if resume == "never":
        return None
    if resume == "auto":
        found = newest_valid(cfg["run"]["out"], kind)
        if found is None:
            return None
    else:
        found = load_checkpoint(resume)
    problems = differences(found["config"], cfg, found["layout"], mpi_shape)
    if problems:
        raise UserError(f"run.resume: checkpoint {found['path']!r} is from a different run: "
                        + "; ".join(problems) + ". Use another run.out, or run.resume = \"never\"")
    return found
