"""`mpifed train` with [comm] shard: the same model as unsharded, memory per rank reported,
sharded checkpoints that resume to the same bits."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from conftest import write_site
from helpers import run_mpi

FEATURES, CLASSES, SAMPLES = 6, 3, 103


def make_run(tmp_path, shard: str, steps: int = 20, out: str = "out", overlap: bool = False):
    rng = np.random.default_rng(42)
    y = rng.integers(0, CLASSES, size=SAMPLES)
    x = rng.standard_normal((SAMPLES, FEATURES)) + y[:, None]
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        fh["x"], fh["y"] = x, y
    (tmp_path / "run.toml").write_text(f"""
[data]
train = "d.h5"
[model]
kind = "mlp"
hidden = [7, 4]
dtype = "float64"
[optim]
name = "adam"
lr = 0.01
batch_size = 4
steps = {steps}
[comm]
shard = "{shard}"
overlap = {str(overlap).lower()}
[run]
seed = 3
out = "{out}"
checkpoint_every = 5
keep_checkpoints = 10
""")


def model_arrays(path):
    """Every dataset of a model file (layers/<i>/W, ...), in name order; never empty."""
    found = {}
    with h5py.File(path) as fh:
        fh.visititems(lambda name, item: found.update(
            {name: item[...]} if isinstance(item, h5py.Dataset) else {}))
    assert found, f"{path} holds no arrays"
    return [found[k] for k in sorted(found)]


def model_bytes(path):
    return [a.tobytes() for a in model_arrays(path)]


def train_federation(tmp_path, config: str, out: str):
    """Write `config` as tmp_path/fed.toml and train it on 4 ranks (it must succeed); return
    tmp_path/out, the run.out folder the config names."""
    (tmp_path / "fed.toml").write_text(config)
    done = run_mpi(4, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return tmp_path / out


@pytest.fixture(scope="module")
def unsharded(tmp_path_factory):
    """The model and summary of shard = "none" on 3 ranks (run once)."""
    folder = tmp_path_factory.mktemp("plain")
    make_run(folder, "none", out="plain")
    done = run_mpi(3, ["train", "run.toml"], cwd=folder)
    assert done.returncode == 0, done.stderr
    return folder / "plain"


def summary_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").open()][-1]


@pytest.mark.parametrize("shard", ["optimizer", "gradients", "parameters"])
def test_sharded_training_equals_unsharded(tmp_path, shard, unsharded):
    ranks = 3
    make_run(tmp_path, shard, overlap=shard != "optimizer")
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for got, want in zip(model_arrays(tmp_path / "out" / "model.h5"),
                         model_arrays(unsharded / "model.h5")):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    summary, plain = summary_of(tmp_path / "out"), summary_of(unsharded)
    n = 6 * 7 + 7 + 7 * 4 + 4 + 4 * 3 + 3
    for key in ("param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_rss_bytes"):
        assert len(summary[key]) == ranks and all(v > 0 for v in summary[key])
    assert plain["optimizer_state_bytes"] == [2 * 8 * n] * ranks  # Adam: m and v, whole
    chunk = -(-(n + 2) // ranks)
    assert max(summary["optimizer_state_bytes"]) <= 2 * 8 * chunk  # within one chunk of 1/p
    if shard == "parameters":
        widest = 6 * 7 + 7 + 2  # the first layer, plus the two slots
        # its chunk and two gather buffers of the largest layer: never the whole model
        assert max(summary["param_bytes"]) <= 8 * (chunk + 2 * widest)


def test_sigkill_then_resume_gives_the_same_bits_and_another_rank_count_resumes(tmp_path):
    """ZeRO-3 on 3 ranks: rank 1 is SIGKILLed after step 12; the same command resumes from the
    step-10 checkpoint to the bits of an uninterrupted run. The step-10 checkpoint, written on
    3 ranks, resumes on 2 and 4 (the parameters and state it holds: test_sharded_step_mpi)."""
    make_run(tmp_path, "parameters", out="whole")
    assert run_mpi(3, ["train", "run.toml"], cwd=tmp_path).returncode == 0
    make_run(tmp_path, "parameters", out="out", overlap=True)
    killed = run_mpi(3, ["train", "run.toml"], cwd=tmp_path,
                     env={"MPIFED_FAULT": "kill:step=12:rank=1"})
    assert killed.returncode != 0
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step-000000005.sharded", "step-000000010.sharded"]
    keep = tmp_path / "step-10"
    shutil.copytree(checkpoints / "step-000000010.sharded", keep)
    again = run_mpi(3, ["train", "run.toml"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "resumed at step 10" in again.stdout + again.stderr
    assert model_bytes(tmp_path / "out" / "model.h5") == model_bytes(
        tmp_path / "whole" / "model.h5")
    for ranks in (2, 4):  # the same run (config, data) in another folder
        folder = tmp_path / f"on-{ranks}"
        shutil.copytree(keep, folder / "out" / "checkpoints" / "step-000000010.sharded")
        for name in ("run.toml", "d.h5"):
            shutil.copy(tmp_path / name, folder / name)
        elsewhere = run_mpi(ranks, ["train", "run.toml"], cwd=folder)
        assert elsewhere.returncode == 0, elsewhere.stderr
        assert "resumed at step 10" in elsewhere.stdout + elsewhere.stderr


@pytest.mark.parametrize("shard", ["optimizer", "gradients", "parameters"])
def test_federation_with_sharded_institutions_equals_unsharded(tmp_path, shard):
    """Two institutions of two ranks each: their ranks shard, the leaders send whole models
    (ZeRO-3: gathered from the chunks; after the root's broadcast each rank keeps its chunk).
    The test set is scored every round (ZeRO-3: layer by layer) and must agree too."""

    for i in range(2):
        write_site(tmp_path / f"site-{i}.h5", 41 + 6 * i, seed=i)
    models, summaries = [], []
    for stage in ("none", shard):
        out = train_federation(tmp_path, f"""
[data]
train = "site-{{institution}}.h5"
test = "site-0.h5"
[model]
kind = "mlp"
hidden = [4]
dtype = "float64"
[optim]
name = "sgd"
lr = 0.05
momentum = 0.9
nesterov = true
batch_size = 3
[comm]
shard = "{stage}"
[federated]
institutions = 2
rounds = 3
local_steps = 4
strategy = "fedprox"
[run]
seed = 5
out = "out-{stage}"
""", f"out-{stage}")
        models.append(model_arrays(out / "model.h5"))
        summaries.append(summary_of(out))
    for got, want in zip(models[1], models[0]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    assert summaries[1]["accuracy"] == summaries[0]["accuracy"]
    assert summaries[1]["test_loss"] == pytest.approx(summaries[0]["test_loss"], rel=1e-6)


@pytest.mark.parametrize("first, then", [("parameters", "none"), ("none", "optimizer")])
def test_a_run_out_with_the_other_kind_of_checkpoints_is_refused(tmp_path, first, then):
    """A comm.shard = "none" run in a run.out holding only sharded checkpoint folders (or the
    other way round) is refused, naming the folder and the fix, instead of starting afresh;
    run.resume = "never" then starts afresh."""
    make_run(tmp_path, first, steps=8)
    assert run_mpi(2, ["train", "run.toml"], cwd=tmp_path).returncode == 0
    kept = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert kept == (["step-000000005.sharded"] if first != "none" else ["step-000000005.h5"])
    make_run(tmp_path, then, steps=8)
    refused = run_mpi(2, ["train", "run.toml"], cwd=tmp_path)
    assert refused.returncode != 0
    text = refused.stdout + refused.stderr
    assert "checkpoints" in text and kept[0] in text and f"comm.shard = {first!r}" in text
    assert 'run.resume = "never"' in text
    again = run_mpi(2, ["train", "run.toml", "--set", "run.resume=never"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr


def test_federation_with_zero3_institutions_under_secure_aggregation(tmp_path):
    """ZeRO-3 institutions under secure aggregation (the private aggregator runs on every rank,
    the leaders' vectors built from the gathered model) give the unsharded federation's model
    to within the quantisation step."""
    for i in range(2):
        write_site(tmp_path / f"site-{i}.h5", 41 + 6 * i, seed=i)
    models = []
    for stage in ("none", "parameters"):
        out = train_federation(tmp_path, f"""
[data]
train = "site-{{institution}}.h5"
[model]
kind = "mlp"
hidden = [4]
dtype = "float64"
[optim]
name = "adam"
lr = 0.01
batch_size = 3
[comm]
shard = "{stage}"
[federated]
institutions = 2
min_participants = 2
rounds = 2
local_steps = 3
strategy = "fedavg"
secure_aggregation = true
[run]
seed = 5
out = "out-{stage}"
""", f"out-{stage}")
        models.append(model_arrays(out / "model.h5"))
    for got, want in zip(models[1], models[0]):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-8)
