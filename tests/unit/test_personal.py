"""Personalisation's pure pieces without MPI: which elements FedBN and FedPer keep local, the
refusals, and the mean/worst summary."""

from __future__ import annotations

import numpy as np
import pytest
from fake_cupy import FakeArray, FakeCupy

import mpifed.xp as xpmod
from mpifed.config import resolve
from mpifed.errors import UserError
from mpifed.federated.personal import check_split, local_summary, shared_mask
from mpifed.nn.models import ModelSpec
from mpifed.nn.presets import resnet
from mpifed.train.federated_personal import Personal, global_model, put_shared, shared_part
from mpifed.xp import to_host

BN_ARRAYS = ("gamma", "beta", "running_mean", "running_var")


def named_elements(spec, flat):
    """Return {array name: its values} of a flat buffer, nested names included."""
    out = {}
    for i, arrays in enumerate(spec.param_views(flat)):
        for name, view in arrays.items():
            out[f"{i}/{name}"] = view.ravel()
    return out


def test_fedbn_keeps_every_batchnorm_array_local_nested_ones_too():
    spec = resnet((3, 8, 8), 10, depth=8)
    flat = np.arange(spec.layout("float64").size, dtype=np.float64)
    mask = shared_mask(spec, "fedbn", dtype="float64")
    local = {int(v) for name, values in named_elements(spec, flat).items()
             if name.rsplit("/", 1)[-1].rsplit(".", 1)[-1] in BN_ARRAYS for v in values}
    assert set(np.flatnonzero(~mask)) == local
    # depth 8: BN over 16 channels, then two per block of 16, 32 and 64: 4 arrays each
    assert (~mask).sum() == 4 * (16 + 2 * 16 + 2 * 32 + 2 * 64)


def test_fedper_keeps_the_listed_layers_local():
    spec = ModelSpec("mlp", 5, (4,), 3)  # flatten, linear 5x4, relu, linear 4x3
    mask = shared_mask(spec, "fedper", (3,), "float32")
    assert mask.size == 5 * 4 + 4 + 4 * 3 + 3
    assert mask[:24].all() and not mask[24:].any()
    assert shared_mask(spec, "none") is None and shared_mask(spec, "ditto") is None


@pytest.mark.parametrize("mode,layers,needle", [
    ("fedbn", (), "the model has none"),
    ("fedper", (4,), "[4] out of range; the model has 4 layers (0 to 3)"),
    ("fedper", (0, 2), "layers without parameters (0: flatten, 2: relu)"),
    ("fedper", (1, 3), "nothing to share"),
])
def test_wrong_splits_are_refused_with_the_key(mode, layers, needle):
    spec = ModelSpec("mlp", 5, (4,), 3)
    mask = shared_mask(spec, mode, tuple(i for i in layers if i < 4), "float32")
    with pytest.raises(UserError, match="federated.personal") as err:
        check_split(spec, mode, layers, mask)
    assert needle in str(err.value)


def test_local_summary_is_the_mean_and_the_minimum():
    assert local_summary([0.5, 0.75, 1.0]) == {"local_accuracy_mean": 0.75,
                                               "local_accuracy_worst": 0.5}


@pytest.mark.parametrize("table,needle", [
    ({"federated": {"institutions": 2, "personal_layers": [3]}},
     "federated.personal_layers: only fedper reads it"),
    ({"federated": {"institutions": 2, "personalization": "fedper", "personal_layers": [3, 3]}},
     "lists a layer twice"),
    ({"federated": {"institutions": 2, "personalization": "fedbn", "dp": {}}},
     "use \"ditto\" there"),
    ({"federated": {"institutions": 2, "personalization": "ditto"},
      "comm": {"shard": "optimizer"}}, "comm.shard = \"none\""),
    ({"federated": {"institutions": 2, "finetune_steps": 3}, "comm": {"shard": "parameters"}},
     "federated.personalization: personal models with comm.shard"),
    ({"data": {"train": "a.h5", "test": "test-{institution}.h5"}},
     "data.test: 'test-{institution}.h5' has an {institution} field"),
    ({"federated": {"institutions": 2, "personalization": "fedpr"}}, "federated.personalization"),
    ({"federated": {"institutions": 2, "personalization": "fedper", "personal_layers": [3],
                    "compression": "rotated"}},
     "fedper with federated.compression = 'rotated' is not supported yet"),
])
def test_settings_that_cannot_work_are_refused_with_the_key(table, needle):
    table = {"data": {"train": "site-{institution}.h5"}, **table}
    with pytest.raises(UserError) as err:
        resolve(table)
    assert needle in str(err.value)


def test_the_split_keeps_device_arrays_on_the_device(monkeypatch):
    """FedPer's helpers on a (fake) CuPy model: the global model and the shared elements written
    back stay device arrays; only the shared part that leaves comes to the host, once."""
    cp = FakeCupy(devices=1)
    monkeypatch.setattr(xpmod, "cupy_module", lambda: cp)
    spec = ModelSpec("mlp", 5, (4,), 3)
    mask = shared_mask(spec, "fedper", (3,), "float32")
    initial = np.arange(mask.size, dtype=np.float32)
    params = cp.asarray(initial + 100)  # trained: every element moved
    personal = Personal("fedper", mask, initial, None, None, "out/institution-0")
    shared = global_model(personal, params)
    assert isinstance(shared, FakeArray)
    np.testing.assert_array_equal(to_host(shared), np.where(mask, initial + 100, initial))
    before = len(cp.of("d2h"))
    leaving = shared_part(personal, to_host(params))
    assert len(cp.of("d2h")) == before + 1 and leaving.size == mask.sum()
    put_shared(personal, params, np.zeros(int(mask.sum()), np.float32), cp)
    assert isinstance(params, FakeArray)
    np.testing.assert_array_equal(to_host(params), np.where(mask, 0, initial + 100))
