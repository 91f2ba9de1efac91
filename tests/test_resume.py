"""Runs killed or preempted at any step resume from their last checkpoint to the same bits."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from conftest import mpiexec, run_mpi

TRAIN = """
[data]
train = "d.h5"
[model]
kind = "mlp"
hidden = [16]
[optim]
name = "{optim}"
lr = 0.01
momentum = 0.9
batch_size = 8
steps = {steps}
[run]
out = "{out}"
checkpoint_every = 37
keep_checkpoints = 2
log_every = 500
"""

FEDERATED = """
[data]
train = "site-{{institution}}.h5"
[model]
kind = "mlp"
hidden = [16]
[optim]
lr = 0.05
momentum = 0.9
batch_size = 8
[federated]
institution_sizes = [1, 2]
rounds = {rounds}
local_steps = 7
strategy = "fedadam"
secure_aggregation = {secure}
[run]
out = "{out}"
checkpoint_every = 3
"""


def write_data(path, samples, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, size=samples)
    with h5py.File(path, "w") as fh:
        fh["x"] = rng.standard_normal((samples, 20)).astype(np.float32) + y[:, None]
        fh["y"] = y
        fh.attrs["num_classes"] = 4


def params_of(path):
    with h5py.File(path) as fh:
        return [fh[f"layers/{i}/{k}"][...] for i in range(len(fh["layers"])) for k in "Wb"]


def start(ranks, config, cwd):
    cmd = [mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpifed", "train", config]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env)


def kill_at_random(proc, rng, lo=0.7, hi=2.0, after=None) -> None:
    """SIGKILL the whole launch (mpiexec and every rank) at a random moment.

    after: a folder; wait first until it holds a checkpoint, so that a slow start (a fresh
    clone's first imports) cannot make the kill land before any step was taken.
    """
    deadline = time.monotonic() + 60
    while after is not None and not list(after.glob("*.h5")) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(lo, hi))
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # it had already finished
    proc.communicate(timeout=30)


def assert_same_bits(got_path, want_path):
    for got, want in zip(params_of(got_path), params_of(want_path)):
        assert got.dtype == want.dtype and np.array_equal(got, want)


@pytest.mark.parametrize("ranks,optim,steps", [(2, "sgd", 12000), (3, "adam", 6000)])
def test_killed_runs_resume_to_the_same_bits(tmp_path, ranks, optim, steps):
    write_data(tmp_path / "d.h5", 3000, seed=1)
    (tmp_path / "full.toml").write_text(TRAIN.format(optim=optim, steps=steps, out="full"))
    (tmp_path / "cut.toml").write_text(TRAIN.format(optim=optim, steps=steps, out="cut"))
    assert run_mpi(ranks, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    rng = random.Random(ranks)
    for _ in range(2):  # killed twice, at random steps
        kill_at_random(start(ranks, "cut.toml", tmp_path), rng)
    assert not (tmp_path / "cut" / "model.h5").exists(), "the kills came too late to test"
    done = run_mpi(ranks, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")
    assert len(list((tmp_path / "cut" / "checkpoints").glob("step-*.h5"))) <= 2  # keep = 2
    assert not list((tmp_path / "cut" / "checkpoints").glob(".*tmp*"))  # no half-written leftovers


def test_sigusr1_checkpoints_and_stops_then_resumes(tmp_path):
    write_data(tmp_path / "d.h5", 3000, seed=2)
    (tmp_path / "full.toml").write_text(TRAIN.format(optim="sgd", steps=8000, out="full"))
    (tmp_path / "cut.toml").write_text(TRAIN.format(optim="sgd", steps=8000, out="cut"))
    assert run_mpi(2, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    proc = start(2, "cut.toml", tmp_path)
    time.sleep(1.2)
    os.kill(proc.pid, signal.SIGUSR1)  # to mpiexec, which forwards it to every rank
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by SIGUSR1" in out
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").open()]
    stopped = [r for r in records if r["event"] == "stopped"]
    assert stopped and stopped[0]["step"] < 8000
    checkpoints = sorted((tmp_path / "cut" / "checkpoints").glob("step-*.h5"))
    assert checkpoints[-1].name == f"step-{stopped[0]['step']:09d}.h5"
    done = run_mpi(2, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0 and f"resumed at step {stopped[0]['step']}" in done.stdout
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")


@pytest.mark.parametrize("secure", ["false", "true"])
def test_federated_run_killed_resumes_to_the_same_bits(tmp_path, secure):
    write_data(tmp_path / "site-0.h5", 400, seed=3)
    write_data(tmp_path / "site-1.h5", 700, seed=4)
    (tmp_path / "full.toml").write_text(FEDERATED.format(rounds=300, out="full", secure=secure))
    (tmp_path / "cut.toml").write_text(FEDERATED.format(rounds=300, out="cut", secure=secure))
    assert run_mpi(3, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    kill_at_random(start(3, "cut.toml", tmp_path), random.Random(7), 0.0, 0.6,
                   after=tmp_path / "cut" / "checkpoints")
    assert not (tmp_path / "cut" / "model.h5").exists(), "the kill came too late to test"
    assert list((tmp_path / "cut" / "checkpoints").glob("round-*.h5")), "nor too early"
    done = run_mpi(3, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")


def test_checkpoint_of_another_run_is_refused(tmp_path):
    write_data(tmp_path / "d.h5", 500, seed=5)
    (tmp_path / "a.toml").write_text(TRAIN.format(optim="sgd", steps=100, out="a"))
    assert run_mpi(2, ["train", "a.toml"], cwd=tmp_path).returncode == 0
    # A longer run may continue from it; a different learning rate or rank count may not.
    done = run_mpi(2, ["train", "a.toml", "--set", "optim.steps=150", "--set", "optim.lr=0.5"],
                   cwd=tmp_path)
    assert done.returncode != 0 and "optim.lr: 0.01 then, 0.5 now" in done.stderr
    done = run_mpi(3, ["train", "a.toml", "--set", "optim.steps=150"], cwd=tmp_path)
    assert done.returncode != 0 and "MPI layout" in done.stderr
    done = run_mpi(2, ["train", "a.toml", "--set", "optim.steps=150"], cwd=tmp_path)
    assert done.returncode == 0 and "resumed at step 74" in done.stdout


def test_divergence_keeps_the_last_good_checkpoint(tmp_path):
    write_data(tmp_path / "d.h5", 500, seed=6)
    (tmp_path / "a.toml").write_text(TRAIN.format(optim="sgd", steps=400, out="a")
                                     .replace("lr = 0.01", "lr = 30.0")
                                     .replace("checkpoint_every = 37", "checkpoint_every = 1"))
    done = run_mpi(2, ["train", "a.toml"], cwd=tmp_path)
    assert done.returncode != 0 and "diverged" in done.stderr
    diverged_at = int(done.stderr.split("at step ")[1].split(";")[0])
    kept = sorted((tmp_path / "a" / "checkpoints").glob("step-*.h5"))
    assert kept and int(kept[-1].stem.split("-")[1]) == diverged_at - 1
    for path in kept:
        with h5py.File(path) as fh:
            assert np.isfinite(fh["params"][...]).all()


def test_an_unforeseen_exception_on_one_rank_ends_all_ranks(tmp_path):
    write_data(tmp_path / "d.h5", 3000, seed=8)
    (tmp_path / "a.toml").write_text(TRAIN.format(optim="sgd", steps=100000, out="a"))
    code = ("import mpifed.nn.models as m; from mpi4py import MPI\n"
            "real = m.loss_and_grad\n"
            "calls = [0]\n"
            "def broken(*a, **k):\n"
            "    calls[0] += 1\n"
            "    if MPI.COMM_WORLD.rank == 1 and calls[0] == 50: raise RuntimeError('boom')\n"
            "    return real(*a, **k)\n"
            "import mpifed.train.step as s; s.loss_and_grad = broken\n"
            "from mpifed.cli.main import main; raise SystemExit(main(['train', 'a.toml']))\n")
    cmd = [mpiexec(), "-n", "3", sys.executable, "-c", code]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "[rank 1]: RuntimeError: boom" in done.stderr


DROPOUT_BN = """
[data]
train = "d.h5"
[model]
kind = "sequential"
layers = [{{type = "linear", out = 16}}, {{type = "batchnorm2d", sync = true}}, {{type = "relu"}},
          {{type = "dropout", p = 0.3}}, {{type = "linear", out = 4}}]
[optim]
lr = 0.01
momentum = 0.9
batch_size = 8
steps = {steps}
[run]
out = "{out}"
checkpoint_every = 37
keep_checkpoints = 2
log_every = 500
"""


def test_dropout_and_batchnorm_runs_resume_to_the_same_bits(tmp_path):
    """Dropout masks come from (seed, step, rank) and running statistics live in the
    checkpointed buffer, so a run killed twice ends with the uncut run's bits, statistics too."""
    from mpifed.nn.io import load_model

    write_data(tmp_path / "d.h5", 3000, seed=3)
    for name in ("full", "cut"):
        (tmp_path / f"{name}.toml").write_text(DROPOUT_BN.format(steps=8000, out=name))
    assert run_mpi(2, ["train", "full.toml"], cwd=tmp_path, timeout=300).returncode == 0
    rng = random.Random(5)
    for _ in range(2):
        kill_at_random(start(2, "cut.toml", tmp_path), rng, after=tmp_path / "cut" / "checkpoints")
    assert not (tmp_path / "cut" / "model.h5").exists(), "the kills came too late to test"
    done = run_mpi(2, ["train", "cut.toml"], cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    (_, got), (_, want) = (load_model(str(tmp_path / p / "model.h5")) for p in ("cut", "full"))
    assert got.dtype == want.dtype and np.array_equal(got, want)
