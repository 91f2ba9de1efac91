"""ResNet-8 with synchronised batch norm, trained by `mpifed train` on 1-3 ranks in float32,
against PyTorch itself: the same weights, the same global batches, torch's own convolutions,
batch norm (on the global batch, which is what SyncBatchNorm computes) and SGD."""

from __future__ import annotations

import itertools

import h5py
import numpy as np
import pytest
from helpers import run_mpi, write_config
from reference import global_batches

from mpifed.nn.io import load_model
from mpifed.nn.layers import layers_from_config
from mpifed.nn.sequential import Sequential

torch = pytest.importorskip("torch")

SHAPE, CLASSES, SAMPLES = (3, 32, 32), 10, 61  # CIFAR-shaped; a prime count: unequal shards


def resnet8_layers(sync: bool) -> list[dict]:
    """The `resnet` preset of depth 8 written out as layers, with batch norm `sync`."""
    def block(channels: int, stride: int) -> dict:
        return {"type": "residual", "layers": [
            {"type": "conv2d", "out": channels, "kernel": 3, "stride": stride, "padding": 1},
            {"type": "batchnorm2d", "sync": sync}, {"type": "relu"},
            {"type": "conv2d", "out": channels, "kernel": 3, "padding": 1},
            {"type": "batchnorm2d", "sync": sync}]}

    layers = [{"type": "conv2d", "out": 16, "kernel": 3, "padding": 1},
              {"type": "batchnorm2d", "sync": sync}, {"type": "relu"}]
    for channels, stride in ((16, 1), (32, 2), (64, 2)):
        layers += [block(channels, stride), {"type": "relu"}]
    return layers + [{"type": "global_avgpool"}, {"type": "linear", "out": CLASSES}]


def torch_copy(model: Sequential, flat: np.ndarray):
    """mpifed.benchmarks.peers.torch_resnet(8) holding mpifed's arrays `flat`: the parameter
    and buffer orders agree layer by layer (conv W, b; gamma, beta, running mean and var)."""
    from mpifed.benchmarks.peers import torch_resnet

    peer = torch_resnet(8, SHAPE[0], CLASSES)
    ours = [a for views in model.param_views(flat) for a in views.values()]
    state = {k: v for k, v in peer.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(ours) == len(state)
    with torch.no_grad():
        for (key, theirs), mine in zip(state.items(), ours):
            mine = mine.T if key.endswith(".weight") and mine.ndim == 2 else mine  # linear
            assert tuple(theirs.shape) == mine.shape, key
            theirs.copy_(torch.from_numpy(np.ascontiguousarray(mine)))
    return peer, list(state)


def torch_reference(flat, x, y, batches, lr, momentum):
    """Train the torch copy on the global batches; return its arrays in mpifed's order."""
    torch.set_num_threads(1)
    model = Sequential(layers_from_config(resnet8_layers(False)), SHAPE, CLASSES)
    peer, keys = torch_copy(model, flat)
    peer.train()
    sgd = torch.optim.SGD(peer.parameters(), lr=lr, momentum=momentum)
    loss_fn = torch.nn.CrossEntropyLoss()
    for rows in batches:
        sgd.zero_grad()
        loss_fn(peer(torch.from_numpy(x[rows])), torch.from_numpy(y[rows])).backward()
        sgd.step()
    state = peer.state_dict()
    return [state[k].numpy().T if k.endswith(".weight") and state[k].ndim == 2
            else state[k].numpy() for k in keys]


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_resnet8_sync_batchnorm_equals_pytorch(tmp_path, ranks):
    rng = np.random.default_rng(3)
    y = rng.integers(0, CLASSES, size=SAMPLES)
    x = (rng.standard_normal((SAMPLES, *SHAPE)) + 0.3 * y[:, None, None, None]).astype("f4")
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        fh["x"], fh["y"] = x, y
    batch, steps, seed, lr, momentum = 4, 4, 7, 0.05, 0.9
    write_config(tmp_path / "run.toml", {
        "data": {"train": "d.h5"},
        "model": {"kind": "sequential", "layers": resnet8_layers(True), "dtype": "float32"},
        "optim": {"lr": lr, "momentum": momentum, "batch_size": batch, "steps": steps},
        "run": {"seed": seed, "out": "out"}})
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path, timeout=180)
    assert done.returncode == 0, done.stderr
    model, got = load_model(str(tmp_path / "out" / "model.h5"))
    start = Sequential(layers_from_config(resnet8_layers(True)), SHAPE, CLASSES).init(seed)
    batches = itertools.islice(global_batches(SAMPLES, ranks, batch, seed, True), steps)
    expected = torch_reference(start, x, y, batches, lr, momentum)
    mine = [a for views in model.param_views(got) for a in views.values()]
    moved = max(float(np.abs(e - s).max()) for e, s in zip(
        expected, [a for v in model.param_views(start) for a in v.values()]))
    assert moved > 1e-3  # the steps changed the parameters by far more than the tolerance
    worst = max(float(np.abs(m - e).max()) for m, e in zip(mine, expected))
    assert worst <= 1e-5, f"max abs difference from PyTorch {worst:.2e}"
