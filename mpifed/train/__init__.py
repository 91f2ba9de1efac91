"""Wiring a training step and a run together: config, the loop, evaluation, reporting.

`run(config)` is the script API: the same run as `mpifed train`, from Python.
"""

from __future__ import annotations


def run(config, overrides=(), comm=None) -> dict:
    """Train as `mpifed train` does and return the summary (the last metrics record) as a dict.

    config: the path of a TOML file, a dict with the same sections ({"data": {...},
    "model": {...}, ...}), or a `mpifed.config.Config`; overrides: "section.key=value"
    strings, as `--set` (not with a Config: use dataclasses.replace). Collective over
    `comm` (MPI.COMM_WORLD by default): under mpiexec every rank calls it; alone, it is one rank.
    """
    import copy

    from mpi4py import MPI

    from ..config import Config, apply_override, load_config, resolve
    from ..errors import UserError
    from .loop import train

    if isinstance(config, Config):
        if overrides:
            raise UserError("overrides: a Config is already resolved; give a path or a dict "
                            "with overrides, or change the Config with dataclasses.replace")
        cfg = config
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)
        for assignment in overrides:
            apply_override(raw, assignment)
        cfg = resolve(raw)
    else:
        cfg = load_config(str(config), overrides)
    return train(cfg, comm or MPI.COMM_WORLD)
