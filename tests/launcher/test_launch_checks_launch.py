"""Launch mistakes refused before anything is written, through `mpifed train` itself: a
singleton launched where the environment says several tasks, and a second job on a run folder
another job holds (OUT/run.lock). The pure logic is in tests/unit/test_launch_checks.py."""

from __future__ import annotations

import json
import os

import pytest
from helpers import (
    assert_same_bits,
    kill_group,
    read_metrics,
    run_cli,
    run_mpi,
    start_mpi,
    stopped_processes,
    wait_until,
    write_config,
    write_dataset,
)

from mpifed.train.run_lock import LOCK_NAME, RunLock

TRAIN = {
    "data": {"train": "d.h5"},
    "model": {"kind": "mlp", "hidden": [8]},
    "optim": {"lr": 0.05, "batch_size": 8, "steps": 40},
    "run": {"out": "out", "checkpoint_every": 10, "log_every": 1000},
}
FEDERATED = {
    "data": {"train": "site-{institution}.h5"},
    "model": {"kind": "mlp", "hidden": [8]},
    "optim": {"lr": 0.05, "batch_size": 8},
    "federated": {"institution_sizes": [1, 1], "rounds": 2, "local_steps": 3},
    "run": {"out": "fed"},
}


@pytest.fixture
def folder(tmp_path):
    write_dataset(tmp_path / "d.h5", 400, 0, features=6, classes=3, dtype="float32")
    for k in range(2):
        write_dataset(tmp_path / f"site-{k}.h5", 200, k, features=6, classes=3, dtype="float32")
    write_config(tmp_path / "run.toml", TRAIN)
    write_config(tmp_path / "fed.toml", FEDERATED)
    return tmp_path


@pytest.mark.parametrize("variable", ["SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                      "PMIX_SIZE"])
def test_a_singleton_under_a_several_task_launch_is_refused(folder, variable):
    done = run_cli(["train", "run.toml"], cwd=folder, env={variable: "4"})
    assert done.returncode == 1
    assert done.stderr.count("mpifed: error") == 1, done.stderr
    assert f"the launcher started 4 tasks ({variable}=4) but MPI sees 1 rank" in done.stderr
    assert "srun --mpi=list" in done.stderr and "Traceback" not in done.stderr
    assert not (folder / "out").exists()  # nothing written, not even the folder


def test_the_other_mislaunched_tasks_fail_silently(folder):
    done = run_cli(["train", "run.toml"], cwd=folder, env={"SLURM_NTASKS": "4",
                                                          "SLURM_PROCID": "3"})
    assert done.returncode == 1 and done.stderr == ""  # task 0 says it, once for all
    assert not (folder / "out").exists()


def test_one_task_inside_a_larger_allocation_runs(folder):
    # srun -n 1 inside a 4-task job: the step says 1, the job 4
    done = run_cli(["train", "run.toml"], cwd=folder,
                   env={"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"})
    assert done.returncode == 0, done.stderr
    assert read_metrics(folder / "out", "summary")[0]["world_size"] == 1


@pytest.mark.parametrize("config,out,ranks", [("run.toml", "out", 2), ("fed.toml", "fed", 2)])
def test_a_second_job_on_a_held_folder_is_refused_naming_the_holder(folder, config, out, ranks):
    (folder / out).mkdir()
    (folder / out / "config.toml").write_text("# the holder's\n")
    with RunLock() as lock:
        lock.take(str(folder / out))
        done = run_mpi(ranks, ["train", config], cwd=folder)
        assert done.returncode == 1
        assert done.stderr.count("mpifed: error") == 1, done.stderr
        assert f"is in use by another run (host {os.uname().nodename}" in done.stderr
        assert f"pid {os.getpid()}" in done.stderr
        assert (folder / out / "config.toml").read_text() == "# the holder's\n"  # untouched
        assert sorted(p.name for p in (folder / out).iterdir()) == ["config.toml", LOCK_NAME]
    done = run_mpi(ranks, ["train", config], cwd=folder)  # the holder ended: the folder is free
    assert done.returncode == 0, done.stderr
    assert not (folder / out / LOCK_NAME).exists()  # a run that ends removes its lock


def test_a_running_job_holds_its_folder_and_a_killed_one_leaves_it_free(folder):
    """A real first job, frozen after step 20 (so it certainly still runs): the second is
    refused with the first's rank 0 named; once the first is killed, the same command resumes
    from its checkpoint to the bits of an uninterrupted run."""
    first = start_mpi(2, ["train", "run.toml"], cwd=folder,
                      env={"MPIFED_FAULT": "stop:step=20:rank=0"})
    try:
        wait_until(lambda: stopped_processes(first), "rank 0 stopping at step 20", proc=first)
        holder = json.loads((folder / "out" / LOCK_NAME).read_text())
        second = run_mpi(2, ["train", "run.toml"], cwd=folder)
        assert second.returncode == 1
        assert f"pid {holder['pid']}" in second.stderr
        assert "in use by another run" in second.stderr
    finally:
        kill_group(first)
    assert (folder / "out" / "checkpoints").is_dir()
    resumed = run_mpi(2, ["train", "run.toml"], cwd=folder)
    assert resumed.returncode == 0, resumed.stderr
    # the fault froze rank 0 after step 20, before its checkpoint: the last one is step 10
    assert read_metrics(folder / "out", "resumed")[0]["step"] == 10
    whole = run_mpi(2, ["train", "run.toml", "--set", 'run.out="whole"'], cwd=folder)
    assert whole.returncode == 0, whole.stderr
    assert_same_bits(folder / "out" / "model.h5", folder / "whole" / "model.h5")


@pytest.mark.parametrize("env,line", [
    ({"OMP_NUM_THREADS": "", "SLURM_CPUS_PER_TASK": "1"},
     "1 (SLURM_CPUS_PER_TASK=1: this rank's own CPUs) on ranks 0-2"),
    ({"OMP_NUM_THREADS": "1"},
     "1 (OMP_NUM_THREADS=1, set by the user, left as set) on ranks 0-2"),
    ({"OMP_NUM_THREADS": "", "MPIFED_BLAS_THREADS": "2"}, "2 (MPIFED_BLAS_THREADS=2) on ranks 0-2"),
])
def test_info_shows_each_ranks_threads_and_why(tmp_path, env, line):
    done = run_mpi(3, ["info"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert f"BLAS threads     : {line}\n" in done.stdout


def test_info_names_a_bad_thread_variable(tmp_path):
    done = run_mpi(2, ["info"], cwd=tmp_path, env={"OMP_NUM_THREADS": "many"})
    assert done.returncode == 0, done.stderr
    assert "BLAS threads     : unusable: OMP_NUM_THREADS='many': a thread count" in done.stdout
