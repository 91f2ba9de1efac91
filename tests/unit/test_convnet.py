"""Convnets end to end: data-parallel training equals a serial computation on the global batch,
model files round-trip, presets, users' factories, N-D data."""

from __future__ import annotations

import sys
from dataclasses import replace

import h5py
import numpy as np
import pytest

from mpifed.errors import UserError
from mpifed.nn.io import load_model, save_model
from mpifed.nn.layers import layers_from_config
from mpifed.nn.models import logits
from mpifed.nn.sequential import Sequential
from mpifed.nn.spec import fit_to_data, model_from_config
from mpifed.train.config import resolve, to_toml

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


def test_model_file_layout_and_round_trip(tmp_path):
    model = Sequential(layers_from_config(LAYERS), SHAPE, CLASSES)
    flat = model.init(3, dtype="float64")
    flat += np.random.default_rng(0).standard_normal(flat.size) * 0.1  # running stats too
    save_model(str(tmp_path / "m.h5"), model, flat)
    with h5py.File(tmp_path / "m.h5") as fh:
        assert fh.attrs["kind"] == "sequential" and fh.attrs["num_classes"] == CLASSES
        assert list(fh.attrs["input_shape"]) == list(SHAPE)
        assert fh["layers/0"].attrs["type"] == "conv2d" and fh["layers/0"].attrs["padding"] == 1
        assert fh["layers/0/W"].shape == (4, 2, 3, 3) and fh["layers/0/b"].shape == (4,)
        assert set(fh["layers/1"]) == {"gamma", "beta", "running_mean", "running_var"}
        assert bool(fh["layers/1"].attrs["sync"]) and fh["layers/1"].attrs["momentum"] == 0.2
        assert fh["layers/3"].attrs["type"] == "residual"
        assert fh["layers/3/layers/0"].attrs["stride"] == 2
        assert fh["layers/3/layers/0/W"].shape == (5, 4, 3, 3)
        assert fh["layers/3/projection/W"].shape == (5, 4, 1, 1)
        assert fh["layers/6/W"].shape == (5 * 2 * 2, CLASSES)
    again, flat2 = load_model(str(tmp_path / "m.h5"))
    assert again == model
    np.testing.assert_array_equal(flat2, flat)
    x = np.random.default_rng(1).standard_normal((4, *SHAPE))
    np.testing.assert_array_equal(logits(again, flat2, x), logits(model, flat, x))


# Counted by hand: LeNet-5 as PyTorch counts it; ResNet-8 = stem conv 448 + BN 32, one block
# per stage of 4704, 14560 and 57792 (biased convs, BN, 1x1 projections), linear 650.
@pytest.mark.parametrize("kind,extra,params", [("lenet5", {}, 61706),
                                               ("resnet", {"depth": 8}, 78186)])
def test_presets_and_their_files(tmp_path, kind, extra, params):
    cfg = resolve({"data": {"train": "d.h5"}, "model": {"kind": kind, **extra}})
    shape = (1, 28, 28) if kind == "lenet5" else (3, 32, 32)
    model = model_from_config(cfg.model, shape, 10)
    trained = model.layout().size - sum(hi - lo for lo, hi in model.buffer_ranges())
    assert trained == params
    flat = model.init(0)
    save_model(str(tmp_path / "m.h5"), model, flat)
    again, flat2 = load_model(str(tmp_path / "m.h5"), dtype="float32")
    assert again == model and again.kind == kind
    np.testing.assert_array_equal(flat2, flat)


def test_factory_model_with_a_layer_of_ones_own(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text('''
from mpifed.nn import layers as L

class Square(L.Layer):
    type = "square"
    def forward(self, p, x, ctx):
        self.x = x
        return x * x
    def backward(self, p, g, dy, ctx, need_dx=True):
        return 2 * self.x * dy if need_dx else None

def build(input_shape, num_classes):
    return [L.Flatten(), L.Linear(4), Square(), L.Linear(num_classes)]
''')
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = resolve({"data": {"train": "d.h5"}, "model": {"factory": "mymodels:build"}})
    model = model_from_config(cfg.model, (1, 3, 3), 2)
    assert model.kind == "factory"
    flat = model.init(1, dtype="float64")
    save_model(str(tmp_path / "m.h5"), model, flat)
    again, flat2 = load_model(str(tmp_path / "m.h5"))
    x = np.random.default_rng(0).standard_normal((3, 9))
    np.testing.assert_array_equal(logits(again, flat2, x), logits(model, flat, x))
    with pytest.raises(UserError, match="model.factory: cannot import 'nosuch'"):
        model_from_config(replace(cfg.model, factory="nosuch:build"), (9,), 2)
    sys.modules.pop("mymodels", None)


def test_model_init_with_other_channels_names_layer_and_shapes(tmp_path):
    model = model_from_config(resolve({"data": {"train": "d"}, "model": {"kind": "lenet5"}})
                              .model, (3, 32, 32), 10)
    save_model(str(tmp_path / "m.h5"), model, model.init(0))
    loaded, _ = load_model(str(tmp_path / "m.h5"))
    with pytest.raises(UserError) as err:
        fit_to_data(loaded, (1, 32, 32), 10, "model.init")
    message = str(err.value)
    assert "layers[0] (conv2d)" in message and "(1, 32, 32)" in message
    assert "(6, 3, 5, 5)" in message and "\n" not in message


def test_old_mlp_files_load_and_images_flatten(tmp_path):
    with h5py.File(tmp_path / "old.h5", "w") as fh:  # as the version before layers wrote it
        fh.attrs["kind"], fh.attrs["hidden"], fh.attrs["num_classes"] = "mlp", [5], 3
        rng = np.random.default_rng(0)
        for i, (a, b) in enumerate([(64, 5), (5, 3)]):
            fh[f"layers/{i}/W"], fh[f"layers/{i}/b"] = rng.random((a, b)), rng.random(b)
    model, flat = load_model(str(tmp_path / "old.h5"))
    assert model.kind == "mlp" and model.input_shape == (64,)
    fit_to_data(model, (1, 8, 8), 3, "model.init")  # digits' rows, as images now
    x = rng.random((2, 1, 8, 8))
    with h5py.File(tmp_path / "old.h5") as fh:
        want = np.maximum(x.reshape(2, 64) @ fh["layers/0/W"][...] + fh["layers/0/b"][...], 0) \
            @ fh["layers/1/W"][...] + fh["layers/1/b"][...]
    np.testing.assert_allclose(logits(model, flat, x), want, rtol=1e-12)


def test_config_checks_and_writes_layers():
    cfg = resolve({"data": {"train": "d.h5"}, "model": {"kind": "sequential", "layers": LAYERS}})
    text = to_toml(cfg)
    import tomllib

    assert tomllib.loads(text)["model"]["layers"] == LAYERS
    with pytest.raises(UserError, match=r"model.layers\[3\].layers\[1\]: unknown key 'moment'"):
        bad = [dict(e) for e in LAYERS]
        bad[3] = dict(bad[3], layers=[bad[3]["layers"][0], {"type": "batchnorm2d", "moment": 1}])
        resolve({"data": {"train": "d"}, "model": {"kind": "sequential", "layers": bad}})
    with pytest.raises(UserError, match="model.depth: a resnet has depth 8, 14 or 20"):
        resolve({"data": {"train": "d"}, "model": {"kind": "resnet", "depth": 10}})
    with pytest.raises(UserError, match="model.layers: only read when"):
        resolve({"data": {"train": "d"}, "model": {"kind": "mlp", "hidden": [3],
                                                   "layers": LAYERS}})


def test_digits_and_synthetic_images_carry_their_shape(tmp_path):
    from mpifed.data.shards import Shard, describe
    from mpifed.data.synth import write_digits, write_synthetic_images

    train, _ = write_digits(str(tmp_path / "digits"))
    info = describe(train)
    assert info.input_shape == (1, 8, 8) and info.features == 64
    write_synthetic_images(str(tmp_path / "s.h5"), 50, (3, 7, 9), 4, seed=1)
    info = describe(str(tmp_path / "s.h5"))
    assert info.input_shape == (3, 7, 9) and info.num_classes == 4
    shard = Shard(info, 10, 20)
    with h5py.File(tmp_path / "s.h5") as fh:
        np.testing.assert_array_equal(shard.x, fh["x"][10:20].reshape(10, -1))
