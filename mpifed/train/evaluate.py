"""Distributed evaluation: each rank scores its shard; sums are all-reduced."""

from __future__ import annotations

import math

import numpy as np
from mpi4py import MPI

from ..comm.scalars import allreduce_int
from ..data.shards import Shard
from ..nn.models import ModelSpec, evaluate_batch

EVAL_BATCH = 4096


def evaluate(spec: ModelSpec, params, shard: Shard, comm, xp) -> dict:
    """Return {"loss", "accuracy", "samples"} of the model over all ranks' shards, and
    "perplexity" for a GPT (loss and accuracy per token, averaged over windows).

    params: the flat parameters, or a sharded model's `LayerGather` (ZeRO-3), gathered layer
    by layer for each batch: every rank then runs as many batches as the longest shard needs,
    walking the gathers without rows once its own shard is done.
    """
    sums = np.zeros(3)  # summed loss, correct, rows
    size = getattr(spec, "eval_batch", EVAL_BATCH)  # a GPT's logits are (B, T, V)
    batches = -(-len(shard) // size)
    if callable(params):
        batches = allreduce_int(comm, batches, MPI.MAX)  # comm may span institutions
    for b in range(batches):
        lo = b * size
        if lo >= len(shard):
            params.walk()  # ZeRO-3 only: the other ranks still gather layer by layer
            continue
        index = np.arange(lo, min(len(shard), lo + size))
        x, y = shard.rows(index)
        loss, correct = evaluate_batch(spec, params, xp.asarray(x), xp.asarray(y))
        sums += (loss, correct, len(index))
    comm.Allreduce(MPI.IN_PLACE, sums, op=MPI.SUM)
    rows = max(sums[2], 1)
    result = {"loss": sums[0] / rows, "accuracy": sums[1] / rows, "samples": int(sums[2])}
    if spec.kind == "gpt":  # a language model: exp of the mean per-token cross-entropy
        result["perplexity"] = math.exp(min(result["loss"], 700.0))
    return result
