"""Checkpoints: everything a run needs to continue to the same bits, written so that a crash at
any moment leaves the previous checkpoint intact.

A checkpoint is OUT/checkpoints/<kind>-<index>.h5 (kind "step" or "round"): the parameters, the
optimiser's (or the server's) state, the counters that place every rank's data stream, the
resolved config and the MPI layout. Randomness in mpifed is derived from (seed, epoch, rank) and
(seed, round), so the seed in the config is the whole RNG state. Files are written to a temporary
name, fsynced and renamed; the newest `keep` are kept. Every dataset carries the SHA-256 of its
bytes and the attributes theirs, checked on load: a damaged newest file falls back to the one
before it with a warning. The data's fingerprint (sizes, shapes, a hash of a few rows) is kept
too, so a resume on data that changed under the same path is refused.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import time

import h5py
import numpy as np

# run.resume: one of these words, or the path of a checkpoint file.
from ..choices import RESUME_MODES  # noqa: F401 (run.resume, named here before)
from ..config.fields import plain
from ..config.sections import ALL_SECTIONS
from ..data.atomic import atomic_path
from ..errors import UserError
from ..log import get_logger

log = get_logger(__name__)

# The <time> in OUT/checkpoints.before-<time> and OUT/previous-<time> (local time, sortable).
SET_ASIDE_STAMP = "%Y%m%d-%H%M%S"

# Keys that may change between a run and its resumption: they change how long it runs or what
# it reports, never the bits of what it computes.
RESUMABLE_CHANGES = {
    ("optim", "epochs"), ("optim", "steps"), ("federated", "rounds"), ("data", "test"),
    ("run", "log_every"), ("run", "eval_every"), ("run", "progress"),
    ("run", "checkpoint_every"), ("run", "resume"), ("run", "keep_checkpoints"),
    ("run", "timeline"), ("comm", "stall_timeout"),
}


def checkpoint_dir(out: str) -> str:
    return os.path.join(out, "checkpoints")


def save_checkpoint(out: str, kind: str, index: int, params, state: dict, counters: dict,
                    cfg, mpi_shape: dict, keep: int, compressor: list | None = None) -> str:
    """Write checkpoint `index` atomically and prune to the newest `keep`; return its path.

    state: name -> array (optimiser or server state); counters: name -> int or list of ints.
    compressor: every rank's compressor state (name -> array or scalar), in rank order, as
    groups compressor/rank-K; None or all empty: no such group.
    """
    path = os.path.join(checkpoint_dir(out), f"{kind}-{index:09d}.h5")
    texts = {"counters": json.dumps(counters), "config": json.dumps(cfg.to_dict()),
             "layout": json.dumps(mpi_shape),  # the file keeps its attribute name
             "data": json.dumps(data_fingerprint(cfg))}
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as fh:
        _dataset(fh, "params", _host(params))
        group = fh.create_group("state")
        for name, value in state.items():
            _dataset(group, name, _host(value))
        if compressor and any(compressor):
            for rank, own in enumerate(compressor):
                part = fh.create_group(f"compressor/rank-{rank}")
                for name, value in own.items():
                    _dataset(part, name, _host(value))
        fh.attrs["kind"], fh.attrs["index"] = kind, index
        for name, text in texts.items():
            fh.attrs[name] = text
        fh.attrs["sha256"] = _sha256(*texts.values())
        fh.attrs["complete"] = True  # last: a file without it was never finished
    for old in list_checkpoints(out, kind)[:-keep]:
        os.remove(old)
    for stale in glob.glob(os.path.join(checkpoint_dir(out), f".{kind}-*.h5.tmp-*")):
        if not stale.endswith(f".tmp-{os.getpid()}"):
            os.remove(stale)  # a write that a killed run never finished
    return path


def _host(array):
    return np.asarray(array.get() if hasattr(array, "get") else array)


def _sha256(*parts) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else
                      np.ascontiguousarray(part).tobytes())
    return digest.hexdigest()


def _dataset(group, name: str, array) -> None:
    """Write `array` with the SHA-256 of its bytes as attribute `sha256`."""
    group.create_dataset(name, data=array).attrs["sha256"] = _sha256(array)


def _verified(dataset):
    """Read a dataset and check it against its `sha256` attribute (when it has one)."""
    value = dataset[()]
    want = dataset.attrs.get("sha256")
    if want is not None and _sha256(np.asarray(value)) != want:
        raise ValueError(f"dataset {dataset.name!r} does not match its checksum")
    return value


def data_fingerprint(cfg) -> dict:
    """Return {path: (bytes, x shape, x dtype, y shape, SHA-256 of the first, middle, last rows)}
    for every training file of `cfg` (each institution's file under a template)."""
    data, fed = cfg.data, cfg.federated
    paths = [data.train]
    if fed and "{institution}" in data.train:
        count = fed.institutions or len(fed.institution_sizes)
        paths = [data.train.format(institution=k) for k in range(count)]
    return {path: _file_fingerprint(path, data.x, data.y) for path in paths}


def _file_fingerprint(path: str, x: str, y: str, rows: int = 64):
    try:
        with h5py.File(path, "r") as fh:
            dx, dy = fh[x], fh[y]
            n = dx.shape[0]
            picks = [(lo, min(n, lo + rows)) for lo in sorted({0, max(0, n // 2 - rows // 2),
                                                               max(0, n - rows)})]
            digest = _sha256(*[a for lo, hi in picks for a in (dx[lo:hi], dy[lo:hi])])
            return [os.path.getsize(path), list(dx.shape), str(dx.dtype), list(dy.shape), digest]
    except (OSError, KeyError):
        return None  # a missing file is reported by the data checks, not here


def list_checkpoints(out: str, kind: str) -> list[str]:
    """Return the checkpoint files of `kind` in run.out, oldest first."""
    pattern = re.compile(rf"{kind}-(\d+)\.h5$")
    found = [p for p in glob.glob(os.path.join(checkpoint_dir(out), f"{kind}-*.h5"))
             if pattern.search(p)]
    return sorted(found, key=lambda p: int(pattern.search(p).group(1)))


def load_checkpoint(path: str) -> dict:
    """Read a checkpoint and verify its checksums; raise UserError if it is unreadable,
    incomplete, damaged or not a checkpoint at all."""
    try:
        with h5py.File(path, "r") as fh:
            if "layers" in fh and "params" not in fh:
                raise UserError(f"run.resume: {path!r} is a model file, not a checkpoint; to "
                                "start from its weights set model.init to it instead")
            if not fh.attrs.get("complete", False):
                raise UserError(f"checkpoint {path!r} is incomplete (its write never finished)")
            texts = {name: str(fh.attrs[name]) for name in ("counters", "config", "layout")}
            data = fh.attrs.get("data")
            want = fh.attrs.get("sha256")
            if want is not None and _sha256(*texts.values(), str(data)) != want:
                raise ValueError("its attributes do not match their checksum")
            return {
                "path": path, "kind": str(fh.attrs["kind"]), "index": int(fh.attrs["index"]),
                "params": _verified(fh["params"]),
                "state": {name: _verified(fh["state"][name]) for name in fh["state"]},
                "compressor": _compressor_states(fh),
                **{name: json.loads(text) for name, text in texts.items()},
                "data": None if data is None else json.loads(data),
            }
    except (OSError, KeyError, ValueError) as err:
        raise UserError(f"checkpoint {path!r} is damaged or unreadable ({err})") from None


def _compressor_states(fh) -> list[dict] | None:
    """Every rank's compressor state in rank order (checked), or None when none was saved."""
    if "compressor" not in fh:
        return None
    group = fh["compressor"]
    return [{name: _verified(group[f"rank-{r}"][name]) for name in group[f"rank-{r}"]}
            for r in range(len(group))]


def newest_valid(out: str, kind: str) -> dict | None:
    """Return the newest checkpoint of `kind` that reads back whole, or None when there is none.

    Falling back past a damaged file prints one warning naming it; when every file is damaged,
    raise UserError rather than silently start afresh.
    """
    paths = list_checkpoints(out, kind)
    bad = []
    for path in reversed(paths):
        try:
            found = load_checkpoint(path)
        except UserError as err:
            bad.append(str(err))
            continue
        for message in bad:
            log.warning("%s; resuming from %r instead", message, path)
        return found
    if bad:
        raise UserError(f"run.resume: every checkpoint in {checkpoint_dir(out)!r} is damaged "
                        f"({bad[0]}); move them aside to start afresh, or set "
                        "run.resume = \"never\"")
    return None


def set_aside(out: str) -> str | None:
    """Move OUT/checkpoints to a new OUT/checkpoints.before-<time> folder; return it (or None)."""
    folder = checkpoint_dir(out)
    if not glob.glob(os.path.join(folder, "*.h5")) + glob.glob(os.path.join(folder, "*.sharded")):
        return None
    stamp = time.strftime(SET_ASIDE_STAMP)
    target, n = f"{folder}.before-{stamp}", 1
    while os.path.exists(target):
        target, n = f"{folder}.before-{stamp}-{n}", n + 1
    os.rename(folder, target)
    return target


def differences(saved_cfg: dict, cfg, saved_shape: dict, mpi_shape: dict) -> list[str]:
    """Return what differs between a checkpoint's run (its config as saved, a dict) and this
    one (a Config), in words (empty: resumable)."""
    problems, cfg = [], cfg.to_dict()
    if saved_shape != mpi_shape:
        problems.append(f"MPI layout {saved_shape} != {mpi_shape}")
    sections = set(saved_cfg) | set(cfg)
    for section in sorted(sections):
        old, new = saved_cfg.get(section) or {}, cfg.get(section) or {}
        for key in sorted(set(old) | set(new)):
            if (section, key) in RESUMABLE_CHANGES or added_at_default(section, key, old, new):
                continue
            if old.get(key) != new.get(key):
                problems.append(f"{section}.{key}: {old.get(key)!r} then, {new.get(key)!r} now")
    return problems


def added_at_default(section: str, key: str, old: dict, new: dict) -> bool:
    """Tell whether `key` is one the checkpoint's config predates (its section was there, the
    key not) and this run leaves at its default: the run computes as the checkpoint's did."""
    declared = ALL_SECTIONS.get(section)
    if not old or key in old or declared is None or key not in declared.declared():
        return False
    return plain(declared.declared()[key].default) == new.get(key)


def choose_checkpoint(cfg, kind: str, mpi_shape: dict) -> dict | None:
    """Return the checkpoint to resume from per run.resume ("auto", "never" or a path), or None.

    A checkpoint from another layout or config is refused, naming what differs.
    """
    resume, out = cfg.run.resume, cfg.run.out
    if resume == "never":
        moved = set_aside(out)
        if moved:  # a fresh run never mixes with (or prunes) another run's checkpoints
            log.info("run.resume = \"never\": moved the earlier checkpoints of %r to %r", out,
                     moved)
        return None
    if resume == "auto":
        found = newest_valid(out, kind)
        if found is None:
            return None
    elif not os.path.isfile(resume):
        raise UserError(f"run.resume: {resume!r} is neither \"auto\", \"never\" nor an existing "
                        "checkpoint file; use one of those")
    else:
        found = load_checkpoint(resume)
    rounds = cfg.federated.rounds if cfg.federated else None
    if kind == "round" and rounds is not None and found["counters"]["round"] > rounds:
        raise UserError(f"federated.rounds: nothing to do, {found['path']!r} is after round "
                        f"{found['counters']['round']}, past this run's {rounds} rounds; raise "
                        "federated.rounds, or set run.resume = \"never\"")
    problems = differences(found["config"], cfg, found["layout"], mpi_shape)
    now = data_fingerprint(cfg)
    for path, then in (found["data"] or {}).items():
        if path in now and then is not None and now[path] != then:
            problems.append(f"data file {path!r} changed since the checkpoint was written "
                            "(size, shape or content)")
    if problems:
        raise UserError(f"run.resume: checkpoint {found['path']!r} is from a different run: "
                        + "; ".join(problems) + ". Use another run.out, or run.resume = \"never\"")
    return found
