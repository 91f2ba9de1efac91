"""Streamed shards under mpiexec: a run equals the serial reference, and a killed one resumes
to the same bits."""

from __future__ import annotations

import itertools
import json

import h5py
import numpy as np
import pytest
from helpers import read_model, run_mpi
from reference import global_batches, initial_weights, mlp_sgd

FEATURES, CLASSES, SAMPLES = 6, 3, 103  # a prime: shards of unequal size, none a block multiple


def write_rows(path, samples=SAMPLES, chunks=None):
    """Write x[i] = (i, i, ...) + noise-free class offset and y; return (x, y)."""
    rng = np.random.default_rng(42)
    y = rng.integers(0, CLASSES, size=samples)
    x = rng.standard_normal((samples, FEATURES)) + y[:, None]
    x[:, 0] = np.arange(samples)  # the row number, to check which rows a batch holds
    with h5py.File(path, "w") as fh:
        fh.create_dataset("x", data=x, chunks=chunks)
        fh["y"] = y
        fh.attrs["num_classes"] = CLASSES
    return x, y


TRAIN = """
[data]
train = "d.h5"
shuffle = true
{data}
[model]
kind = "mlp"
hidden = [5]
dtype = "float64"
[optim]
lr = 0.05
momentum = 0.9
batch_size = 4
steps = {steps}
[run]
seed = 3
out = "{out}"
log_every = 5
timeline = true
checkpoint_every = {every}
"""


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("data,block,buffer", [("shuffle_block = 5\nshuffle_buffer = 3", 5, 3),
                                               ("", 6, 4)])  # defaults: chunk rows, 4 blocks
def test_streamed_run_equals_serial_reference(tmp_path, ranks, data, block, buffer):
    x, y = write_rows(tmp_path / "d.h5", chunks=(6, FEATURES))
    steps = 23  # crosses epochs on every rank count
    (tmp_path / "run.toml").write_text(TRAIN.format(data=data, steps=steps, out="out", every=0))
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path, timeout=120,
                   env={"MPIFED_SHARD_MEMORY_BYTES": "1"})
    assert done.returncode == 0, done.stderr
    weights = initial_weights(FEATURES, 5, CLASSES, 3)
    batches = itertools.islice(global_batches(SAMPLES, ranks, 4, 3, True, block, buffer), steps)
    expected = mlp_sgd(x, y, weights, batches, 0.05, 0.9)
    for g, e in zip(read_model(tmp_path / "out" / "model.h5"), expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    trace = json.loads((tmp_path / "out" / "timeline.json").read_text())
    for rank in range(ranks):
        reads = [e for e in trace["traceEvents"] if e["pid"] == rank and e["name"] == "read"]
        assert reads and all(e["tid"] == 1 and e["args"]["MB_per_s"] > 0 for e in reads)
        assert all(e["args"]["bytes"] == e["args"]["rows"] * FEATURES * 8 for e in reads)
        assert all(1 <= e["args"]["rows"] <= block for e in reads)
    summary = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary["data_wait_seconds"] >= 0


def test_streamed_run_resumes_to_the_same_bits(tmp_path):
    write_rows(tmp_path / "d.h5", chunks=(6, FEATURES))
    env = {"MPIFED_SHARD_MEMORY_BYTES": "1"}
    (tmp_path / "full.toml").write_text(TRAIN.format(data="", steps=37, out="full", every=0))
    assert run_mpi(2, ["train", "full.toml"], cwd=tmp_path, env=env).returncode == 0
    (tmp_path / "cut.toml").write_text(TRAIN.format(data="", steps=17, out="cut", every=16))
    assert run_mpi(2, ["train", "cut.toml"], cwd=tmp_path, env=env).returncode == 0
    (tmp_path / "cut.toml").write_text(TRAIN.format(data="", steps=37, out="cut", every=16))
    done = run_mpi(2, ["train", "cut.toml"], cwd=tmp_path, env=env)
    assert done.returncode == 0 and "resumed at step 16" in done.stdout, done.stderr
    for got, want in zip(read_model(tmp_path / "cut" / "model.h5"),
                         read_model(tmp_path / "full" / "model.h5")):
        assert np.array_equal(got, want)
