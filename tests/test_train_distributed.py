"""`mpifed train` under mpiexec equals an independent single-process computation.

The reference below shares no code with mpifed's model, loss or optimiser: it rebuilds each
global batch from the sharding rule (rank 0's rows, then rank 1's, ...) and runs plain NumPy SGD
with momentum on it.
"""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from conftest import run_mpi

from mpifed.nn.models import ModelSpec, init_params

FEATURES, CLASSES, SAMPLES = 6, 3, 103  # a prime: shards of unequal size


def make_data(path):
    rng = np.random.default_rng(42)
    y = rng.integers(0, CLASSES, size=SAMPLES)
    x = rng.standard_normal((SAMPLES, FEATURES)) + y[:, None]
    with h5py.File(path, "w") as fh:
        fh["x"], fh["y"] = x, y


def reference_batches(p, batch, steps, seed, shuffle):
    """Yield the global batch row numbers of each step, from the sharding rule."""
    bounds = [((r * SAMPLES) // p, ((r + 1) * SAMPLES) // p) for r in range(p)]
    per_epoch = min(b - a for a, b in bounds) // batch
    for step in range(steps):
        epoch, k = divmod(step, per_epoch)
        rows = []
        for r, (a, b) in enumerate(bounds):
            order = (np.random.default_rng([seed, epoch, r]).permutation(b - a) if shuffle
                     else np.arange(b - a))
            rows.append(a + order[k * batch:(k + 1) * batch])
        yield np.concatenate(rows)


def reference_mlp_sgd(x, y, weights, batches, lr, momentum):
    """Plain NumPy: 1-hidden-layer ReLU MLP, mean cross-entropy, SGD with momentum."""
    w1, b1, w2, b2 = (w.copy() for w in weights)
    velocity = [np.zeros_like(w) for w in (w1, b1, w2, b2)]
    for rows in batches:
        xb, yb = x[rows], y[rows]
        pre = xb @ w1 + b1
        hidden = np.maximum(pre, 0)
        out = hidden @ w2 + b2
        prob = np.exp(out - out.max(1, keepdims=True))
        prob /= prob.sum(1, keepdims=True)
        prob[np.arange(len(rows)), yb] -= 1
        d_out = prob / len(rows)
        d_hidden = (d_out @ w2.T) * (pre > 0)
        grads = (xb.T @ d_hidden, d_hidden.sum(0), hidden.T @ d_out, d_out.sum(0))
        for param, vel, grad in zip((w1, b1, w2, b2), velocity, grads):
            vel *= momentum
            vel += grad
            param -= lr * vel
    return w1, b1, w2, b2


@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
@pytest.mark.parametrize("algorithm,shuffle", [("ring", True), ("mpi", False)])
def test_distributed_equals_serial(tmp_path, ranks, algorithm, shuffle):
    make_data(tmp_path / "d.h5")
    batch, steps, seed, lr, momentum = 4, 23, 3, 0.05, 0.9  # 23 steps: crosses epochs
    (tmp_path / "run.toml").write_text(f"""
[data]
train = "d.h5"
shuffle = {str(shuffle).lower()}
[model]
kind = "mlp"
hidden = [5]
dtype = "float64"
[optim]
lr = {lr}
momentum = {momentum}
batch_size = {batch}
steps = {steps}
[comm]
allreduce = "{algorithm}"
[run]
seed = {seed}
out = "out"
log_every = 5
""")
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    with h5py.File(tmp_path / "d.h5") as fh:
        x, y = fh["x"][...], fh["y"][...]
    spec = ModelSpec("mlp", FEATURES, (5,), CLASSES)
    flat = init_params(spec, seed, dtype="float64")
    shapes = [(FEATURES, 5), (5,), (5, CLASSES), (CLASSES,)]
    cuts = np.cumsum([0] + [int(np.prod(s)) for s in shapes])
    weights = [flat[a:b].reshape(s) for a, b, s in zip(cuts, cuts[1:], shapes)]
    expected = reference_mlp_sgd(x, y, weights, reference_batches(ranks, batch, steps, seed,
                                                                  shuffle), lr, momentum)
    with h5py.File(tmp_path / "out" / "model.h5") as fh:
        got = [fh["layers/0/W"][...], fh["layers/0/b"][...], fh["layers/1/W"][...],
               fh["layers/1/b"][...]]
    for g, e in zip(got, expected):
        np.testing.assert_allclose(g, e, rtol=1e-5, atol=1e-7)
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").open()]
    steps_logged = [r for r in records if r["event"] == "step"]
    assert {"step", "epoch", "loss", "lr", "samples_per_s", "comm_fraction"} <= set(
        steps_logged[0])
    summary = records[-1]
    assert summary["event"] == "summary" and summary["steps"] == steps
    assert summary["samples"] == steps * batch * ranks
    assert (tmp_path / "out" / "config.toml").exists()


def test_evaluate_matches_training_report(tmp_path):
    make_data(tmp_path / "d.h5")
    (tmp_path / "run.toml").write_text(
        '[data]\ntrain = "d.h5"\ntest = "d.h5"\n[optim]\nbatch_size = 8\nepochs = 3\n'
        '[run]\nout = "out"\n')
    assert run_mpi(2, ["train", "run.toml"], cwd=tmp_path).returncode == 0
    summary = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    for ranks in (1, 3):
        done = run_mpi(ranks, ["evaluate", "out/model.h5", "d.h5"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        accuracy = float(done.stdout.split("accuracy")[1].split()[0])
        assert accuracy == pytest.approx(summary["accuracy"], abs=1e-4)
    # An independent count of correct predictions, from the model file alone.
    with h5py.File(tmp_path / "out" / "model.h5") as fh, h5py.File(tmp_path / "d.h5") as data:
        pred = (data["x"][...] @ fh["layers/0/W"][...] + fh["layers/0/b"][...]).argmax(1)
        assert (pred == data["y"][...]).mean() == pytest.approx(summary["accuracy"], abs=1e-6)
