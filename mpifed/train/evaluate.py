"""Distributed evaluation: each rank scores its shard; sums are all-reduced."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ..comm.agree import raise_together
from ..data.shards import Shard, describe, shard_bounds
from ..errors import UserError
from ..nn.models import ModelSpec, evaluate_batch

EVAL_BATCH = 4096


def open_checked_shard(comm, path: str, x: str, y: str, dtype, key: str,
                       features: int | None = None) -> tuple[Shard, int]:
    """Open this rank's shard of `path` after checking it on all ranks; return (shard, classes).

    Checks (collectively, so every rank stops together): the file and its datasets, the feature
    count against `features`, finite values, non-negative labels. Classes come from the file's
    `num_classes` attribute, else max(y)+1 over all shards.
    """
    info = raise_together(comm, lambda: describe(path, x, y, key))
    if features is not None and info.features != features:
        raise UserError(f"{key}: {path!r} has {info.features} features, the model expects "
                        f"{features}")
    start, stop = shard_bounds(info.samples, comm.size, comm.rank)
    shard = raise_together(comm, lambda: Shard(info, start, stop, dtype))

    def check_values():
        if not shard.all_finite():
            raise UserError(f"{key}: {path!r} has NaN or Inf in {x!r} among rows "
                            f"[{start}, {stop}); clean the data")
        low, _ = shard.label_range()
        if low < 0:
            raise UserError(f"{key}: {path!r} has a negative label ({low}) in {y!r}")
    raise_together(comm, check_values)
    top = comm.allreduce(shard.label_range()[1], op=MPI.MAX)
    classes = info.num_classes if info.num_classes is not None else top + 1

    def check_classes():
        if shard.label_range()[1] >= classes:
            raise UserError(f"{key}: label {shard.label_range()[1]} in {path!r} is out of range "
                            f"for num_classes={classes} (labels must be 0..{classes - 1})")
    raise_together(comm, check_classes)
    return shard, classes


def open_test_shard(comm, cfg: dict, spec: ModelSpec, dtype) -> Shard:
    """Open this rank's shard of data.test, checked against the model (collective)."""
    data = cfg["data"]
    shard, classes = open_checked_shard(comm, data["test"], data["x"], data["y"], dtype,
                                        "data.test", features=spec.features)
    if classes > spec.num_classes:
        raise UserError(f"data.test: {data['test']!r} has labels up to {classes - 1}, but the "
                        f"model knows {spec.num_classes} classes (0..{spec.num_classes - 1}); "
                        "give the training file a num_classes attribute that covers both")
    return shard


def evaluate(spec: ModelSpec, params, shard: Shard, comm, xp) -> dict:
    """Return {"loss", "accuracy", "samples"} of the model over all ranks' shards."""
    sums = np.zeros(3)  # summed loss, correct, rows
    for lo in range(0, len(shard), EVAL_BATCH):
        index = np.arange(lo, min(len(shard), lo + EVAL_BATCH))
        x, y = shard.rows(index)
        loss, correct = evaluate_batch(spec, params, xp.asarray(x), xp.asarray(y))
        sums += (loss, correct, len(index))
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    rows = max(sums[2], 1)
    return {"loss": sums[0] / rows, "accuracy": sums[1] / rows, "samples": int(sums[2])}
