"""The Python API's pieces in one process: the in-memory shard, the summary type, what
config.toml records of objects, and a one-rank run on arrays against the file run."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import assert_same_bits, make_classification, write_h5
from mpi4py import MPI

import mpifed
from mpifed.config import resolve
from mpifed.data.memory import ARRAYS, MemoryShard, check_arrays
from mpifed.data.shards import Shard, describe
from mpifed.data.stream import BatchStream, shard_stream
from mpifed.errors import UserError
from mpifed.nn import Layer, Linear, ReLU, Sequential
from mpifed.train import Summary
from mpifed.train.inputs import RunInputs, recorded_config
from mpifed.train.setup import open_memory_shard

# ---- the in-memory shard ---------------------------------------------------------------------

def test_memory_shard_reads_like_a_file_shard(tmp_path):
    x, y = make_classification(40, seed=1, features=6)
    write_h5(tmp_path / "d.h5", x=x, y=y)
    info = describe(str(tmp_path / "d.h5"))
    from_file = Shard(info, 10, 30, "float32")
    held = MemoryShard(x[10:30], y[10:30], start=10, samples=40, dtype="float32")
    assert len(held) == len(from_file) == 20 and (held.start, held.stop) == (10, 30)
    assert held.info.input_shape == (6,) and held.info.features == 6 and held.info.samples == 40
    index = np.array([3, 0, 19, 7])
    for got, want in zip(held.rows(index), from_file.rows(index)):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    assert held.label_range() == from_file.label_range() and held.all_finite()
    stream = shard_stream(held, 4, 5, seed=3, rank=0, shuffle=True)
    assert isinstance(stream, BatchStream)  # held whole: never the file's block stream
    assert np.array_equal(stream.next_rows(held)[1], shard_stream(
        from_file, 4, 5, seed=3, rank=0, shuffle=True).next_rows(from_file)[1])


def test_memory_shard_keeps_images_flat_with_their_shape():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float64).reshape(2, 3, 4, 4)
    held = MemoryShard(x, np.array([0, 1]), 0, 2, "float32")
    assert held.x.shape == (2, 48) and held.x.dtype == np.float32
    assert held.info.input_shape == (3, 4, 4) and held.x_chunks() is None


@pytest.mark.parametrize("pair,words", [
    (np.zeros((3, 2)), "a pair (x, y)"),
    ((np.zeros(3), np.zeros(3, int)), "(rows, features)"),
    ((np.array([["a"]]), np.zeros(1, int)), "numeric"),
    ((np.zeros((3, 2)), np.zeros(3)), "integer labels"),
    ((np.zeros((3, 2)), np.zeros(2, int)), "3 rows but y has 2"),
    ((np.array([[0.0], [np.inf]]), np.zeros(2, int)), "NaN or Inf (first in row 1)"),
    ((np.zeros((2, 1)), np.array([0, -1])), "negative label"),
])
def test_arrays_that_make_no_shard_are_refused_naming_data(pair, words):
    with pytest.raises(UserError, match="^data: ") as err:
        check_arrays(pair, "data")
    assert words in str(err.value)


def test_classes_are_the_largest_label_plus_one():
    x, y = make_classification(12, seed=0, classes=4)
    shard, classes = open_memory_shard(MPI.COMM_SELF, (x, y), "float64", "data")
    assert classes == int(y.max()) + 1 and shard.info.samples == 12
    with pytest.raises(UserError, match="at least two classes"):
        open_memory_shard(MPI.COMM_SELF, (x, np.ones(12, int)), "float64", "data")
    with pytest.raises(UserError, match="the model expects 9"):
        open_memory_shard(MPI.COMM_SELF, (x, y), "float64", "test", features=9)


# ---- the summary ------------------------------------------------------------------------------

def test_summary_reads_as_the_dict_it_was_and_by_name():
    record = {"event": "summary", "steps": 5, "samples_per_s": 12.5, "loss": 0.25}
    summary = Summary(record)
    assert summary == record and summary["samples_per_s"] == 12.5 == summary.samples_per_s
    assert summary.steps == 5 and summary.accuracy is None and summary.rounds is None
    assert json.loads(json.dumps(summary)) == record
    with pytest.raises(AttributeError):
        summary.no_such_key  # noqa: B018 -- attributes are the declared ones only


# ---- what config.toml records ----------------------------------------------------------------

BASE = {"data": {"train": ARRAYS}, "optim": {"steps": 2}}


def test_a_model_of_library_layers_is_recorded_as_its_layers():
    model = Sequential([Linear(8), ReLU(), Linear(3)], (6,), 3)
    cfg = recorded_config(resolve(BASE), RunInputs(model=model, data=(0, 0)))
    assert cfg.model.kind == "sequential"
    assert [dict(t) for t in cfg.model.layers] == [{"type": "linear", "out": 8},
                                                    {"type": "relu"},
                                                    {"type": "linear", "out": 3}]
    rebuilt = mpifed.nn.spec.model_from_config(cfg.model, (6,), 3)
    assert rebuilt.init(0, np, "float32").tolist() == model.init(0, np, "float32").tolist()


class Square(Layer):
    type = "square"

    def forward(self, p, x, ctx):
        return x * x


def test_a_model_of_own_layers_is_recorded_as_an_object():
    model = Sequential([Square(), Linear(3)], (6,), 3)
    cfg = recorded_config(resolve(BASE), RunInputs(model=model, data=(0, 0)))
    assert cfg.model.kind == "object" and cfg.model.layers == ()
    with pytest.raises(UserError, match="model.factory"):
        mpifed.nn.spec.model_from_config(cfg.model, (6,), 3)


@pytest.mark.parametrize("raw,inputs,words", [
    ({"model": {"factory": "m:f"}}, {"model": True, "data": True}, "model.factory = 'm:f'; use one"),
    ({"data": {"train": "d.h5"}}, {"data": True}, "data.train names 'd.h5'"),
    ({}, {}, "pass data=(x, y)"),
    ({"data": {"test": "t.h5"}}, {"data": True, "test": True}, "data.test names 't.h5'"),
    ({"federated": {"institutions": 2}}, {"data": True}, "a federation ([federated])"),
])
def test_contradictions_are_refused(raw, inputs, words):
    model = Sequential([Linear(3)], (6,), 3)
    given = RunInputs(model=model if inputs.get("model") else None,
                      data=(0, 0) if inputs.get("data") else None,
                      test=(0, 0) if inputs.get("test") else None)
    raw = {k: dict(BASE.get(k, {}), **v) for k, v in {**BASE, **raw}.items()}
    with pytest.raises(UserError) as err:
        recorded_config(resolve(raw), given)
    assert words in str(err.value)


def test_run_in_one_process_equals_the_file_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    x, y = make_classification(30, seed=2, features=4, dtype="float32")
    write_h5("d.h5", {"num_classes": 3}, x=x, y=y)
    layers = [{"type": "linear", "out": 5}, {"type": "tanh"}, {"type": "linear", "out": 3}]
    common = {"optim": {"steps": 9, "batch_size": 4, "momentum": 0.9},
              "run": {"seed": 4, "progress": "none"}}
    file_run = mpifed.train.run({**common, "data": {"train": "d.h5"},
                                 "model": {"kind": "sequential", "layers": layers},
                                 "run": dict(common["run"], out="file")}, comm=MPI.COMM_SELF)
    steps = []
    model = Sequential(mpifed.nn.layers.layers_from_config(layers), (4,), 3)
    array_run = mpifed.train.run({**common, "run": dict(common["run"], out="arrays")},
                                 comm=MPI.COMM_SELF, data=(x, y), model=model,
                                 callbacks=[steps.append])
    assert isinstance(array_run, Summary) and array_run.loss == file_run["loss"]
    assert [s.step for s in steps] == list(range(1, 10)) and steps[-1].loss == array_run.loss
    assert_same_bits(tmp_path / "arrays" / "model.h5", tmp_path / "file" / "model.h5")
