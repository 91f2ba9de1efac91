"""`mpifed train` under mpiexec equals an independent single-process computation.

The reference (tests/reference.py) shares no code with mpifed's model, loss or optimiser: it
rebuilds each global batch from the sharding rule (rank 0's rows, then rank 1's, ...) and runs
plain NumPy SGD with momentum on it.
"""

from __future__ import annotations

import itertools
import json

import h5py
import numpy as np
import pytest
from helpers import read_metrics, read_model, run_mpi, write_config, write_dataset
from reference import global_batches, initial_weights, mlp_sgd

FEATURES, CLASSES, SAMPLES = 6, 3, 103  # a prime: shards of unequal size


def make_data(path):
    """Write the data file; return (x, y)."""
    return write_dataset(path, SAMPLES, seed=42, features=FEATURES, classes=CLASSES, shift=1.0,
                  num_classes=False)


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm,shuffle,overlap,per_node", [("ring", True, False, None),
                                                                ("mpi", False, False, None),
                                                                ("auto", True, True, None),
                                                                ("hierarchical", True, False, 2)])
def test_distributed_equals_serial(tmp_path, ranks, algorithm, shuffle, overlap, per_node):
    x, y = make_data(tmp_path / "d.h5")
    batch, steps, seed, lr, momentum = 4, 23, 3, 0.05, 0.9  # 23 steps: crosses epochs
    write_config(tmp_path / "run.toml", {
        "data": {"train": "d.h5", "shuffle": shuffle},
        "model": {"kind": "mlp", "hidden": [5], "dtype": "float64"},
        "optim": {"lr": lr, "momentum": momentum, "batch_size": batch, "steps": steps},
        "comm": {"allreduce": algorithm, "overlap": overlap},
        "run": {"seed": seed, "out": "out", "log_every": 5},
    })
    env = {"MPIFED_RANKS_PER_NODE": str(per_node)} if per_node else None  # emulated nodes
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    weights = initial_weights(FEATURES, 5, CLASSES, seed)
    batches = itertools.islice(global_batches(SAMPLES, ranks, batch, seed, shuffle), steps)
    expected = mlp_sgd(x, y, weights, batches, lr, momentum)
    got = read_model(tmp_path / "out" / "model.h5")
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    records = read_metrics(tmp_path / "out")
    steps_logged = [r for r in records if r["event"] == "step"]
    assert {"step", "epoch", "loss", "lr", "samples_per_s", "comm_fraction"} <= set(
        steps_logged[0])
    summary = records[-1]
    assert summary["event"] == "summary" and summary["steps"] == steps
    assert summary["samples"] == steps * batch * ranks
    assert (tmp_path / "out" / "config.toml").exists()


def test_evaluate_matches_training_report(tmp_path):
    make_data(tmp_path / "d.h5")
    write_config(tmp_path / "run.toml", {"data": {"train": "d.h5", "test": "d.h5"},
                                         "optim": {"batch_size": 8, "epochs": 3},
                                         "run": {"out": "out"}})
    assert run_mpi(2, ["train", "run.toml"], cwd=tmp_path).returncode == 0
    summary = read_metrics(tmp_path / "out")[-1]
    for ranks in (1, 3):
        done = run_mpi(ranks, ["evaluate", "out/model.h5", "d.h5"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        accuracy = float(done.stdout.split("accuracy")[1].split()[0])
        assert accuracy == pytest.approx(summary["accuracy"], abs=1e-4)
    # An independent count of correct predictions, from the model file alone.
    with h5py.File(tmp_path / "out" / "model.h5") as fh, h5py.File(tmp_path / "d.h5") as data:
        pred = (data["x"][...] @ fh["layers/0/W"][...] + fh["layers/0/b"][...]).argmax(1)
        assert (pred == data["y"][...]).mean() == pytest.approx(summary["accuracy"], abs=1e-6)


def test_timeline_has_every_rank_and_step(tmp_path):
    make_data(tmp_path / "d.h5")
    write_config(tmp_path / "run.toml", {"data": {"train": "d.h5"},
                                         "optim": {"batch_size": 4, "steps": 12},
                                         "run": {"out": "out", "timeline": True}})
    assert run_mpi(3, ["train", "run.toml"], cwd=tmp_path).returncode == 0
    trace = json.loads((tmp_path / "out" / "timeline.json").read_text())
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    for rank in range(3):
        mine = [e for e in spans if e["pid"] == rank]
        assert sorted({e["args"]["step"] for e in mine}) == list(range(1, 13))
        assert {e["name"] for e in mine} == {"data", "compute", "allreduce"}
        assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in mine)
    summary = read_metrics(tmp_path / "out")[-1]
    rank0_comm = sum(e["dur"] for e in spans if e["pid"] == 0 and e["name"] == "allreduce")
    assert rank0_comm / 1e6 == pytest.approx(summary["comm_seconds"], rel=1e-6)
