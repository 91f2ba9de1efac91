"""Wiring a training step and a run together: config, the loop, evaluation, reporting.

`run(config, ...)` is the script API: the same run as `mpifed train`, from Python, taking
objects as well (a model, this rank's arrays, callbacks). `import mpifed` suffices:
`mpifed.train.run(...)`; MPI starts at the first call.
"""

from __future__ import annotations

import importlib

# Imported when first used (PEP 562): `import mpifed.train` starts no MPI.
_WHERE = {"ARRAYS": "..data.memory", "RunInputs": ".inputs", "StepRecord": ".inputs",
          "Summary": ".summary"}

__all__ = ["run", *sorted(_WHERE)]


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mpifed.train' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name], __name__), name)


def run(config, overrides=(), comm=None, *, model=None, data=None, test=None,
        callbacks=()):
    """Train as `mpifed train` does; return the summary (the metrics file's last record) as a
    `Summary`: a dict whose common keys are attributes too (summary.samples_per_s).

    Collective over `comm` (MPI.COMM_WORLD by default): under mpiexec every rank calls it with
    the same configuration; alone, it is one rank.

    config: the path of a TOML file, a dict with the same sections ({"model": {...},
        "optim": {...}, ...}), or a `mpifed.config.Config`; overrides: "section.key=value"
        strings, as `--set` (not with a Config: use dataclasses.replace).
    model: an `mpifed.nn.Sequential` to train instead of [model] (not with model.init or
        model.factory); its parameters are drawn from run.seed as [model]'s would be. Its
        classes count unless the labels need more.
    data: this rank's training rows (x, y) instead of data.train: x (rows, features) or (rows,
        C, H, W), numeric and finite, converted to model.dtype; y (rows,) integer labels >= 0.
        Every rank passes its own shard (row order across ranks: rank 0's, then rank 1's ...).
        Classes: max(y) + 1 over all ranks. In a dict or file, leave data.train out; in a
        Config, set data.train = mpifed.train.ARRAYS ("<arrays>").
    test: this rank's test rows (x, y) instead of data.test, the same way.
    callbacks: functions called on every rank after each data-parallel step with a
        `StepRecord(step, loss, lr)`, and after each federated round with (round, record),
        the round's metrics record as a dict. One raising stops every rank.

    config.toml in run.out records arrays as data.train = "<arrays>" and a model object as
    model.layers (kind "object" for layers of one's own). A federation takes callbacks, but
    not yet arrays or a model object.

        >>> x, y = my_rows(rank)                          # this rank's shard, NumPy arrays
        >>> model = Sequential([Linear(32), ReLU(), Linear(10)], (64,), 10)
        >>> summary = run({"optim": {"lr": 0.1, "epochs": 3}}, data=(x, y), model=model)
        >>> summary["samples_per_s"], summary.accuracy
    """
    import copy

    from mpi4py import MPI

    from ..config import Config, apply_override, read_raw, resolve_warned
    from ..data.memory import ARRAYS
    from ..errors import UserError
    from .inputs import RunInputs, recorded_config
    from .loop import train
    from .summary import Summary

    inputs = RunInputs(model, data, test, callbacks)
    if isinstance(config, Config):
        if overrides:
            raise UserError("overrides: a Config is already resolved; give a path or a dict "
                            "with overrides, or change the Config with dataclasses.replace")
        cfg = config
    else:
        raw = copy.deepcopy(config) if isinstance(config, dict) else read_raw(str(config))
        for assignment in overrides:
            apply_override(raw, assignment)
        if data is not None and isinstance(raw.get("data", {}), dict):
            raw.setdefault("data", {}).setdefault("train", ARRAYS)
        cfg = resolve_warned(raw)
    cfg = recorded_config(cfg, inputs)
    return Summary(train(cfg, comm or MPI.COMM_WORLD, inputs))

