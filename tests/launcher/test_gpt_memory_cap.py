"""A GPT whose parameters, gradients and AdamW state do not fit a per-rank memory cap trains
under ZeRO-3 on 4 ranks within it.

The cap, per rank: 1/p of the model state (parameters, gradients, m and v: 4 x n x 4 bytes),
plus the activations the run reports, plus 10%, plus 150 MiB for the interpreter and libraries
(NumPy, h5py, mpi4py and MPI's own buffers). The run's `peak_rss_bytes` (the process's peak
resident set, getrusage) must stay under it on every rank, while the whole state alone exceeds
it: unsharded, the model could not train within the cap."""

from __future__ import annotations

import json

import h5py
import numpy as np
from helpers import run_mpi

RANKS = 4
MIB = 1 << 20


def test_zero3_gpt_trains_within_a_cap_its_whole_state_exceeds(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 256, 4000)
    with h5py.File(tmp_path / "t.h5", "w") as fh:
        fh.create_dataset("tokens", data=tokens.astype(np.uint8)).attrs["vocab_size"] = 256
    (tmp_path / "run.toml").write_text("""
[data]
train = "t.h5"
[model]
kind = "gpt"
n_layer = 16
n_head = 6
n_embd = 384
block_size = 32
recompute = true
[optim]
name = "adamw"
lr = 0.001
batch_size = 1
steps = 3
[comm]
shard = "parameters"
[run]
out = "out"
progress = "none"
""")
    done = run_mpi(RANKS, ["train", "run.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    records = [json.loads(s) for s in (tmp_path / "out" / "metrics.jsonl").read_text().split("\n")
               if s]
    summary = records[-1]
    with h5py.File(tmp_path / "out" / "model.h5") as fh:
        n = sum(fh["state_dict"][k].size for k in fh["state_dict"] if k != "lm_head.weight")
        block = sum(fh["state_dict"][k].size for k in fh["state_dict"]
                    if k.startswith("transformer.h.0."))
        embedding = fh["state_dict/transformer.wte.weight"].size + \
            fh["state_dict/transformer.wpe.weight"].size
    state = 4 * n * 4  # parameters, gradients, m, v in float32
    chunk, widest = -(-(n + 2) // RANKS), max(block, embedding) + 2
    # parameters: this rank's chunk and two buffers of one block each, never the whole model
    assert max(summary["param_bytes"]) <= 4 * (chunk + 2 * widest) < 4 * n / 2
    for rank in range(RANKS):
        cap = (state / RANKS + summary["activation_bytes"][rank]) * 1.1 + 150 * MIB
        assert summary["peak_rss_bytes"][rank] <= cap, (rank, summary["peak_rss_bytes"], cap)
        assert state > cap  # unsharded, the state alone would not fit
