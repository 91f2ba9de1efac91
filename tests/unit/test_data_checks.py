"""Data and model files that change, lie or hold nonsense stop the run with one named error."""

import os

import h5py
import numpy as np
import pytest
from mpi4py import MPI

from mpifed.config import DPConfig, FederatedConfig, ModelConfig
from mpifed.data.shards import Shard, describe
from mpifed.errors import UserError
from mpifed.federated.dp import update_noise_multiplier
from mpifed.federated.dp_settings import dp_settings
from mpifed.nn.io import load_model, save_model
from mpifed.nn.models import ModelSpec, init_params
from mpifed.train.setup import build_model, open_checked_shard


def write(path, x, y, **attrs):
    with h5py.File(path, "w") as fh:
        fh.create_dataset("x", data=x, chunks=(min(len(x), 16), max(x.shape[1], 1))
                          if x.size else None)
        fh["y"] = y
        fh.attrs.update(attrs)


@pytest.mark.parametrize("change", ["truncated", "replaced"])
def test_a_file_truncated_during_per_batch_reads_stops(tmp_path, monkeypatch, change):
    path = str(tmp_path / "d.h5")
    write(path, np.ones((400, 8), np.float32), np.arange(400) % 3)
    monkeypatch.setenv("MPIFED_SHARD_MEMORY_BYTES", "0")
    shard = Shard(describe(path), 0, 400)
    assert shard.x is None and shard.rows(np.arange(10))[0].sum() == 80
    if change == "truncated":
        os.truncate(path, os.path.getsize(path) // 2)
    else:  # another file of the same size put at the path (a new inode)
        write(str(tmp_path / "new.h5"), np.zeros((400, 8), np.float32), np.arange(400) % 3)
        os.replace(tmp_path / "new.h5", path)
    with pytest.raises(UserError, match="changed or was truncated"):
        shard.rows(np.arange(300, 310))
    shard.close()


def test_missing_virtual_source_and_external_link(tmp_path):
    with h5py.File(tmp_path / "src.h5", "w") as fh:
        fh["x"] = np.ones((10, 3))
    with h5py.File(tmp_path / "v.h5", "w") as fh:
        layout = h5py.VirtualLayout((10, 3), "f8")
        layout[:] = h5py.VirtualSource("src.h5", "x", (10, 3))
        fh.create_virtual_dataset("x", layout, fillvalue=0)
        fh["y"] = np.arange(10) % 2
    assert describe(str(tmp_path / "v.h5")).samples == 10
    os.remove(tmp_path / "src.h5")
    with pytest.raises(UserError, match="source file 'src.h5' is missing"):
        describe(str(tmp_path / "v.h5"))
    with h5py.File(tmp_path / "l.h5", "w") as fh:
        fh["x"] = h5py.ExternalLink("gone.h5", "/x")
        fh["y"] = np.arange(10) % 2
    with pytest.raises(UserError, match="link to 'gone.h5'"):
        describe(str(tmp_path / "l.h5"))


def test_a_corrupt_chunk_names_file_and_dataset(tmp_path):
    path = tmp_path / "g.h5"
    with h5py.File(path, "w") as fh:
        fh.create_dataset("x", data=np.random.default_rng(0).random((400, 20)), chunks=(50, 20),
                          compression="gzip")
        fh["y"] = np.arange(400) % 3
        offset = fh["x"].id.get_chunk_info(3).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset + 50:offset + 150] = bytes(100)
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="dataset '/x' cannot be read"):
        Shard(describe(str(path)), 0, 400)


@pytest.mark.parametrize("value", ["three", np.array([3, 4]), 1e12, 3.7, -1, 1])
def test_num_classes_attribute_must_be_a_whole_number(tmp_path, value):
    write(tmp_path / "d.h5", np.ones((10, 2)), np.zeros(10, int), num_classes=value)
    with pytest.raises(UserError, match="attribute num_classes"):
        describe(str(tmp_path / "d.h5"))


@pytest.mark.parametrize("rows,features,needle", [(0, 3, "no rows"), (10, 0, "no features")])
def test_empty_data_is_named(tmp_path, rows, features, needle):
    write(tmp_path / "d.h5", np.ones((rows, features)), np.zeros(rows, int))
    with pytest.raises(UserError, match=needle):
        describe(str(tmp_path / "d.h5"))


def test_one_class_is_refused(tmp_path):
    write(tmp_path / "d.h5", np.ones((10, 2)), np.full(10, 2))
    with pytest.raises(UserError, match="at least two classes"):
        open_checked_shard(MPI.COMM_SELF, str(tmp_path / "d.h5"), "x", "y", "float32",
                           "data.train")


def model_file(tmp_path, spec, fill=None):
    params = init_params(spec, 0, np, np.float32)
    if fill is not None:
        params[3] = fill
    path = str(tmp_path / "m.h5")
    save_model(path, spec, params)
    return path


def test_model_init_must_match_model_section(tmp_path):
    path = model_file(tmp_path, ModelSpec("softmax", 4, (), 3))
    model = ModelConfig(init=path, kind="mlp", hidden=[32])
    with pytest.raises(UserError, match="kind = 'softmax'.*kind = 'mlp'"):
        build_model(model, 0, 4, 3, np, np.float32)
    model = ModelConfig(init=path, kind="softmax")
    assert build_model(model, 0, 4, 3, np, np.float32)[0].kind == "softmax"


def test_broken_model_files_are_named(tmp_path):
    path = model_file(tmp_path, ModelSpec("softmax", 4, (), 3), fill=np.nan)
    with pytest.raises(UserError, match="NaN or Inf in layers/0/W"):
        load_model(path)
    with h5py.File(path, "r+") as fh:
        fh.attrs["kind"] = "transformer"
    with pytest.raises(UserError, match="model.init: .* holds kind = 'transformer'"):
        load_model(path)
    with h5py.File(path, "w") as fh:
        fh.create_group("layers")
        fh.attrs["kind"], fh.attrs["num_classes"] = "softmax", 3
    with pytest.raises(UserError, match="empty 'layers' group"):
        load_model(path)


@pytest.mark.parametrize("institutions", [1, 2, 3, 5, 10, 11, 100])
def test_adaptive_dp_defaults_work_for_small_federations(institutions):
    dp = DPConfig(clip=1.0, noise_multiplier=1.0, delta=1e-5, adaptive=True)
    fed = FederatedConfig(institutions=institutions, fraction=1.0, dp=dp)
    got = dp_settings(fed, institutions)
    assert got.clip_count_stddev == max(institutions / 20, 1.0)  # max(qK/20, z), README
    assert update_noise_multiplier(1.0, got.clip_count_stddev) <= 1 / np.sqrt(0.75) + 1e-12
    assert fed.dp.clip_count_stddev is None  # derived for the run, never written back
