"""Runs killed or preempted at any step resume from their last checkpoint to the same bits.

The kills land at steps or rounds that the run itself reaches (the MPIFED_FAULT hook of
mpifed/faults.py), never after a guessed delay: a fast machine cannot finish first, a slow one
cannot be killed before it starts.
"""

from __future__ import annotations

import os
import random
import signal

import h5py
import numpy as np
import pytest
from helpers import (
    assert_same_bits,
    has_pending,
    kill_group,
    paused_processes,
    read_metrics,
    run_mpi,
    start_mpi,
    stopped_processes,
    wait_until,
    write_config,
    write_dataset,
)

from mpifed.launch import launcher_family, mpiexec_path

# Open MPI's mpirun forwards SIGUSR1 and carries on; a SIGTERM ends the job: it sends the
# ranks SIGCONT at once, SIGTERM odls_base_sigkill_timeout seconds later (1 by default), SIGKILL
# as long again after that, and exits 1 whatever they did (measured with Open MPI 4.1.4). This
# grace lets the ranks checkpoint and stop between the SIGTERM and the SIGKILL (docs/cluster.md).
OPENMPI_GRACE = {"OMPI_MCA_odls_base_sigkill_timeout": "15"}

TRAIN = {
    "data": {"train": "d.h5"},
    "model": {"kind": "mlp", "hidden": [16]},
    "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": 8},
    "run": {"checkpoint_every": 37, "keep_checkpoints": 2, "log_every": 500},
}

FEDERATED = {
    "data": {"train": "site-{institution}.h5"},
    "model": {"kind": "mlp", "hidden": [16]},
    "optim": {"lr": 0.05, "momentum": 0.9, "batch_size": 8},
    "federated": {"institution_sizes": [1, 2], "local_steps": 7, "strategy": "fedadam"},
    "run": {"checkpoint_every": 3},
}


def write_data(path, samples, seed):
    write_dataset(path, samples, seed, features=20, classes=4, shift=1.0, dtype="float32")


def fault(action: str, point: str, number: int, rank: int) -> dict:
    return {"MPIFED_FAULT": f"{action}:{point}={number}:rank={rank}"}


def kill_from_outside(ranks, config, cwd, step, rank) -> None:
    """Freeze `rank` after `step`, then SIGKILL every process of the launch (as a job killer)."""
    proc = start_mpi(ranks, ["train", config], cwd=cwd, env=fault("stop", "step", step, rank))
    wait_until(lambda: stopped_processes(proc), f"rank {rank} stopping at step {step}",
               proc=proc)
    kill_group(proc)


@pytest.mark.parametrize("ranks,optim,steps", [(2, "sgd", 700), (3, "adam", 500)])
def test_killed_runs_resume_to_the_same_bits(tmp_path, ranks, optim, steps):
    write_data(tmp_path / "d.h5", 3000, seed=1)
    for out in ("full", "cut"):
        write_config(tmp_path / f"{out}.toml", TRAIN,
                     {"optim": {"name": optim, "steps": steps}, "run": {"out": out}})
    assert run_mpi(ranks, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    rng = random.Random(ranks)
    first, second = sorted(rng.sample(range(1, steps), 2))  # two random steps, random ranks
    killed = run_mpi(ranks, ["train", "cut.toml"], cwd=tmp_path,
                     env=fault("kill", "step", first, rng.randrange(ranks)))
    assert killed.returncode != 0, "the fault did not kill the run"
    kill_from_outside(ranks, "cut.toml", tmp_path, second, rng.randrange(ranks))
    assert not (tmp_path / "cut" / "model.h5").exists(), "the kills came too late to test"
    done = run_mpi(ranks, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"resumed at step {second // 37 * 37}" in done.stdout
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")
    assert len(list((tmp_path / "cut" / "checkpoints").glob("step-*.h5"))) <= 2  # keep = 2
    assert not list((tmp_path / "cut" / "checkpoints").glob(".*tmp*"))  # no half-written leftovers


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_sigusr1_checkpoints_and_stops_then_resumes(tmp_path, sig):
    write_data(tmp_path / "d.h5", 3000, seed=2)
    for out in ("full", "cut"):
        write_config(tmp_path / f"{out}.toml", TRAIN,
                     {"optim": {"name": "sgd", "steps": 400}, "run": {"out": out}})
    assert run_mpi(2, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    # Rank 0 freezes after step 100; the signal reaches it while frozen, so once it goes on
    # it asks to stop at step 101, and the other rank learns so in that step's all-reduce.
    openmpi = launcher_family(mpiexec_path())[0] == "openmpi"
    ended_by_launcher = openmpi and sig == signal.SIGTERM
    if ended_by_launcher:  # mpirun's SIGCONT would end a SIGSTOP: rank 0 waits in pause()
        proc = start_mpi(2, ["train", "cut.toml"], cwd=tmp_path,
                         env={**fault("pause", "step", 100, 0), **OPENMPI_GRACE})
        wait_until(lambda: paused_processes(proc), "rank 0 pausing", proc=proc)
        os.kill(proc.pid, sig)  # SIGTERM reaches the ranks a grace later; SIGKILL after that
    else:
        proc = start_mpi(2, ["train", "cut.toml"], cwd=tmp_path,
                         env=fault("stop", "step", 100, 0))
        [frozen] = wait_until(lambda: stopped_processes(proc), "rank 0 stopping", proc=proc)
        os.kill(proc.pid, sig)  # to mpiexec, which forwards it to every rank
        wait_until(lambda: has_pending(frozen, sig), f"{sig.name} reaching rank 0")
        os.kill(frozen, signal.SIGCONT)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == (1 if ended_by_launcher else 0), err
    assert f"stopped by {sig.name}" in out
    stopped = read_metrics(tmp_path / "cut", "stopped")
    assert stopped and stopped[0]["step"] == 101
    checkpoints = sorted((tmp_path / "cut" / "checkpoints").glob("step-*.h5"))
    assert checkpoints[-1].name == f"step-{stopped[0]['step']:09d}.h5"
    done = run_mpi(2, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0 and f"resumed at step {stopped[0]['step']}" in done.stdout
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")


@pytest.mark.parametrize("secure", [False, True])
def test_federated_run_killed_resumes_to_the_same_bits(tmp_path, secure):
    write_data(tmp_path / "site-0.h5", 400, seed=3)
    write_data(tmp_path / "site-1.h5", 700, seed=4)
    rounds = 20
    for out in ("full", "cut"):
        write_config(tmp_path / f"{out}.toml", FEDERATED, {
            "federated": {"rounds": rounds, "secure_aggregation": secure,
                          "min_participants": 2}, "run": {"out": out}})
    assert run_mpi(3, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    rng = random.Random(7)
    at = rng.randrange(4, rounds)  # after the checkpoint of round 3
    killed = run_mpi(3, ["train", "cut.toml"], cwd=tmp_path,
                     env=fault("kill", "round", at, rng.randrange(3)))
    assert killed.returncode != 0, "the fault did not kill the run"
    assert not (tmp_path / "cut" / "model.h5").exists(), "the kill came too late to test"
    assert list((tmp_path / "cut" / "checkpoints").glob("round-*.h5")), "nor too early"
    done = run_mpi(3, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")


def test_checkpoint_of_another_run_is_refused(tmp_path):
    write_data(tmp_path / "d.h5", 500, seed=5)
    write_config(tmp_path / "a.toml", TRAIN, {"optim": {"name": "sgd", "steps": 100},
                                              "run": {"out": "a"}})
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
    write_config(tmp_path / "a.toml", TRAIN, {"optim": {"name": "sgd", "steps": 400, "lr": 30.0},
                                              "run": {"out": "a", "checkpoint_every": 1}})
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
    write_config(tmp_path / "a.toml", TRAIN, {"optim": {"name": "sgd", "steps": 1000},
                                              "run": {"out": "a"}})
    done = run_mpi(3, ["train", "a.toml"], cwd=tmp_path, env=fault("raise", "step", 50, 1))
    assert done.returncode == 3, done.stderr  # MPI_Abort(COMM_WORLD, 3)
    assert "[rank 1]: RuntimeError: injected fault raise:step=50:rank=1" in done.stderr


DROPOUT_BN = dict(TRAIN, model={
    "kind": "sequential",
    "layers": [{"type": "linear", "out": 16}, {"type": "batchnorm2d", "sync": True},
               {"type": "relu"}, {"type": "dropout", "p": 0.3}, {"type": "linear", "out": 4}]})


def test_dropout_and_batchnorm_runs_resume_to_the_same_bits(tmp_path):
    """Dropout masks come from (seed, step, rank) and running statistics live in the
    checkpointed buffer, so a run killed twice ends with the uncut run's bits, statistics too."""
    write_data(tmp_path / "d.h5", 3000, seed=3)
    for out in ("full", "cut"):
        write_config(tmp_path / f"{out}.toml", DROPOUT_BN,
                     {"optim": {"steps": 300}, "run": {"out": out}})
    assert run_mpi(2, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    killed = run_mpi(2, ["train", "cut.toml"], cwd=tmp_path, env=fault("kill", "step", 90, 1))
    assert killed.returncode != 0, "the fault did not kill the run"
    kill_from_outside(2, "cut.toml", tmp_path, 200, 0)
    assert not (tmp_path / "cut" / "model.h5").exists(), "the kills came too late to test"
    done = run_mpi(2, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resumed at step 185" in done.stdout
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")

