"""Convnets under mpiexec: data-parallel training with sync batch norm equals a serial
computation on the global batch, and the script API returns the summary."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest
from helpers import run_mpi, write_config
from reference import global_batches

from mpifed.nn.io import load_model
from mpifed.nn.layers import Context, layers_from_config
from mpifed.nn.models import logits
from mpifed.nn.sequential import Sequential

SHAPE, CLASSES, SAMPLES = (2, 6, 5), 3, 61  # odd sizes; a prime count: unequal shards

LAYERS = [
    {"type": "conv2d", "out": 4, "kernel": 3, "padding": 1},
    {"type": "batchnorm2d", "sync": True, "momentum": 0.2},
    {"type": "relu"},
    {"type": "residual", "layers": [
        {"type": "conv2d", "out": 5, "kernel": 3, "stride": 2, "padding": 1},
        {"type": "batchnorm2d", "sync": True}, {"type": "relu"},
        {"type": "conv2d", "out": 5, "kernel": 3, "padding": 1}]},
    {"type": "maxpool2d", "kernel": 2, "stride": 1},
    {"type": "flatten"},
    {"type": "linear", "out": CLASSES},
]


def make_images(path, n=SAMPLES, seed=42):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, size=n)
    x = rng.standard_normal((n, *SHAPE)) + 0.5 * y[:, None, None, None]
    with h5py.File(path, "w") as fh:
        fh["x"], fh["y"] = x, y
    return x, y


def serial_reference(x, y, batches, seed, lr, momentum):
    """The global batch on one process: the same layers with unsynchronised batch norm (so
    statistics are the global batch's) and plain NumPy SGD with momentum written here; no
    sharding, all-reduce, synchronised statistics or training step from mpifed."""
    plain = [dict(e, sync=False) if e["type"] == "batchnorm2d" else e for e in LAYERS]
    plain[3] = dict(LAYERS[3], layers=[dict(e, sync=False) if e["type"] == "batchnorm2d" else e
                                       for e in LAYERS[3]["layers"]])
    model = Sequential(layers_from_config(plain), SHAPE, CLASSES)
    flat = model.init(seed, dtype="float64")
    stats = np.zeros(flat.size, bool)
    for lo, hi in model.buffer_ranges("float64"):
        stats[lo:hi] = True
    velocity = np.zeros_like(flat)
    for rows in batches:
        grad = np.zeros_like(flat)
        model.loss_and_grad(flat, x[rows], y[rows], grad, ctx=Context())
        new_stats = grad[stats].copy()
        grad[stats] = 0
        velocity = momentum * velocity + grad
        flat -= lr * velocity
        flat[stats] = new_stats
    return flat


@pytest.mark.parametrize("ranks,overlap", [(1, False), (2, False), (3, True), (4, False),
                                           (4, True)])
def test_convnet_with_sync_batchnorm_equals_serial(tmp_path, ranks, overlap):
    x, y = make_images(tmp_path / "d.h5")
    batch, steps, seed, lr, momentum = 3, 9, 5, 0.05, 0.9
    write_config(tmp_path / "run.toml", {
        "data": {"train": "d.h5"},
        "model": {"kind": "sequential", "layers": LAYERS, "dtype": "float64"},
        "optim": {"lr": lr, "momentum": momentum, "batch_size": batch, "steps": steps},
        "comm": {"overlap": overlap}, "run": {"seed": seed, "out": "out"}})
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    batches = itertools.islice(global_batches(SAMPLES, ranks, batch, seed, True), steps)
    expected = serial_reference(x, y, batches, seed, lr, momentum)
    model, got = load_model(str(tmp_path / "out" / "model.h5"))
    assert model.kind == "sequential" and model.input_shape == SHAPE
    np.testing.assert_allclose(got, expected, rtol=1e-7, atol=1e-9)


def test_script_api_returns_the_summary(tmp_path):
    """mpifed.train.run(dict) alone: the summary it returns is the metrics file's last record,
    and its accuracy is an independent count from the model file."""
    import json

    from mpifed.train import run

    make_images(tmp_path / "d.h5", n=40)
    out = str(tmp_path / "out")
    summary = run({"data": {"train": str(tmp_path / "d.h5"), "test": str(tmp_path / "d.h5")},
                   "model": {"kind": "sequential", "dtype": "float64", "layers": [
                       {"type": "conv2d", "out": 3, "kernel": 3}, {"type": "tanh"},
                       {"type": "global_avgpool"}, {"type": "linear", "out": CLASSES}]},
                   "optim": {"batch_size": 8, "steps": 6}, "run": {"out": out,
                                                                  "progress": "none"}},
                  overrides=["optim.lr=0.2"])
    last = json.loads((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()[-1])
    assert summary == last and summary["steps"] == 6
    model, flat = load_model(out + "/model.h5")
    with h5py.File(tmp_path / "d.h5") as fh:
        x, y = fh["x"][...], fh["y"][...]
    assert summary["accuracy"] == pytest.approx((logits(model, flat, x).argmax(1) == y).mean())
