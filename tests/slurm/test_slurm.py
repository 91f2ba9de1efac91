"""The jobs/ scripts under a real single-node SLURM (tests/slurm/start-local-slurm.sh starts it).

`make test-slurm` starts the cluster and runs these; without a reachable SLURM they skip, saying
why. Job state is read with `scontrol show job` (accounting is off on the local cluster).

The local cluster's MpiDefault is none, which the PyPI MPICH cannot use: the jobs here name its
plugin (MPIFED_SRUN_MPI=pmi2), as a user of such a site would, and one test shows what the site
default does to it (each task alone, refused before anything is written).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import ROOT, assert_same_bits, read_metrics, run_mpi, write_config, write_dataset


def slurm_reason() -> str:
    if not shutil.which("sbatch"):
        return "sbatch is not installed (make test-slurm installs and starts a local SLURM)"
    probe = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
    if probe.returncode != 0 or not probe.stdout.strip():
        return "no SLURM controller answers (make test-slurm starts a local one)"
    return ""


pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(bool(slurm_reason()), reason=slurm_reason() or "ok"),
              pytest.mark.timeout(300)]

VENV = str(Path(sys.executable).parent.parent)

CONFIG = {
    "data": {"train": "d.h5"},
    "model": {"kind": "mlp", "hidden": [16]},
    "optim": {"lr": 0.01, "momentum": 0.9, "batch_size": 8},
    "run": {"checkpoint_every": 100, "log_every": 1000},
}


def write_data(path, samples=2000, seed=0):
    write_dataset(path, samples, seed, features=20, classes=4, shift=1.0, dtype="float32",
                  num_classes=False)


def write_run(path, steps):
    write_config(path, CONFIG, {"optim": {"steps": steps}})


def sbatch(cwd, *args, **extra_env) -> str:
    env = dict(os.environ, MPIFED_VENV=VENV, OMP_NUM_THREADS="1", MPIFED_SRUN_MPI="pmi2")
    env.update(extra_env)
    done = subprocess.run(["sbatch", "--export=ALL", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=True)
    return re.search(r"Submitted batch job (\d+)", done.stdout).group(1)


def job_field(job: str, field: str) -> str:
    text = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                          text=True).stdout
    found = re.search(rf"\b{field}=(\S+)", text)
    return found.group(1) if found else ""


def wait_for(job: str, states: set[str], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_field(job, "JobState")
        if state in states:
            return state
        time.sleep(1)
    subprocess.run(["scancel", job])
    raise AssertionError(f"job {job} did not reach {states} in {timeout} s "
                         f"(last state {job_field(job, 'JobState')})")


def test_train_job_completes_and_matches_mpiexec(tmp_path):
    write_data(tmp_path / "d.h5")
    write_run(tmp_path / "run.toml", 300)
    job = sbatch(tmp_path, "-n", "2", str(ROOT / "jobs" / "train.sbatch"), "run.toml")
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    model = tmp_path / "runs" / f"mpifed-{job}" / "model.h5"
    assert model.exists()
    # The same run through the PyPI MPICH's own launcher gives the same bits as srun's PMI.
    assert run_mpi(2, ["train", "run.toml", "--set", "run.out=direct"], cwd=tmp_path).returncode == 0
    assert_same_bits(model, tmp_path / "direct" / "model.h5")


# Long enough that the job still runs when its first checkpoint appears and the test signals
# it; short enough that the resumed job ends in the test's time on a loaded two-core machine.
STEPS_TO_PREEMPT = 12000


@pytest.mark.timeout(1200)
def test_preempted_job_requeues_and_resumes(tmp_path):
    write_data(tmp_path / "d.h5")
    write_run(tmp_path / "run.toml", STEPS_TO_PREEMPT)
    job = sbatch(tmp_path, "-n", "2", str(ROOT / "jobs" / "train.sbatch"), "run.toml")
    out = tmp_path / "runs" / f"mpifed-{job}"
    deadline = time.monotonic() + 120
    while not list((out / "checkpoints").glob("step-*.h5")):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    deadline = time.monotonic() + 120
    while job_field(job, "Restarts") in ("", "0"):
        assert time.monotonic() < deadline, "the job was not requeued"
        time.sleep(1)
    # SLURM holds a requeued job for its credential's lifetime (cred_expire, 120 s): starting
    # it sooner (scontrol update StartTime=now) races the revoked credential of its first run
    # and fails it ("Job credential revoked"), so the test waits as a user would.
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=600) == "COMPLETED"
    records = read_metrics(out)
    stopped = [r for r in records if r["event"] == "stopped"]
    resumed = [r for r in records if r["event"] == "resumed"]
    assert stopped and resumed and resumed[0]["step"] == stopped[0]["step"] < STEPS_TO_PREEMPT
    assert records[-1]["event"] == "summary" and records[-1]["steps"] == STEPS_TO_PREEMPT
    log = (tmp_path / f"slurm-mpifed-{job}.out").read_text()
    assert "requeueing job" in log and "restart 1" in log
    assert run_mpi(2, ["train", "run.toml", "--set", "run.out=direct"], cwd=tmp_path,
                   timeout=400).returncode == 0
    assert_same_bits(out / "model.h5", tmp_path / "direct" / "model.h5")


def test_federated_job_completes(tmp_path):
    for k, n in enumerate([300, 500]):
        write_data(tmp_path / f"site-{k}.h5", n, seed=k)
    write_config(tmp_path / "fed.toml", CONFIG, {
        "data": {"train": "site-{institution}.h5"},
        "federated": {"institution_sizes": [1, 2], "rounds": 5, "local_steps": 4}})
    job = sbatch(tmp_path, "-n", "3", str(ROOT / "jobs" / "train.sbatch"), "fed.toml")
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    rounds = read_metrics(tmp_path / "runs" / f"mpifed-{job}", "round")
    assert [r["round"] for r in rounds] == [1, 2, 3, 4, 5]


def test_scaling_job_writes_one_csv(tmp_path):
    job = sbatch(tmp_path, "-n", "2", str(ROOT / "jobs" / "scaling.sbatch"), "--steps", "20",
                 "--hidden", "64")
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    rows = (tmp_path / "runs" / f"scaling-{job}" / "scaling.csv").read_text().splitlines()
    assert rows[0].startswith("ranks,nodes,mode")
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert float(rows[1].split(",")[-1]) == 1.0 and 0 < float(rows[2].split(",")[-1]) < 2


def test_missing_config_fails_the_job_with_one_message(tmp_path):
    job = sbatch(tmp_path, "-n", "2", str(ROOT / "jobs" / "train.sbatch"), "nothing.toml")
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "FAILED"
    log = (tmp_path / f"slurm-mpifed-{job}.out").read_text()
    assert log.count("mpifed: error") == 1 and "nothing.toml" in log


def test_train_job_with_mpiexec_launcher(tmp_path):
    write_data(tmp_path / "d.h5")
    write_run(tmp_path / "run.toml", 200)
    job = sbatch(tmp_path, "-n", "3", str(ROOT / "jobs" / "train.sbatch"), "run.toml",
                 MPIFED_LAUNCHER="mpiexec")
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    log = (tmp_path / f"slurm-mpifed-{job}.out").read_text()
    assert "mpifed train: 3 ranks" in log  # the rank count came from the allocation
    assert (tmp_path / "runs" / f"mpifed-{job}" / "model.h5").exists()


def wait_for_text(path: Path, text: str, timeout: float = 120) -> str:
    """Return the file at `path` once it holds `text` (a job's log is written as it goes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in (found := path.read_text()):
            return found
        time.sleep(0.5)
    raise AssertionError(f"{path} did not come to hold {text!r} in {timeout} s")


def wait_for_checkpoint(out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "checkpoints").glob("step-*.h5")):
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.5)


def test_plain_scancel_stops_without_requeue(tmp_path):
    write_data(tmp_path / "d.h5")
    write_run(tmp_path / "run.toml", 40000)
    job = sbatch(tmp_path, "-n", "2", str(ROOT / "jobs" / "train.sbatch"), "run.toml")
    out = tmp_path / "runs" / f"mpifed-{job}"
    wait_for_checkpoint(out)
    subprocess.run(["scancel", job], check=True)  # TERM to the script and the ranks
    log = wait_for_text(tmp_path / f"slurm-mpifed-{job}.out", "not requeued")
    assert "requeueing" not in log
    assert wait_for(job, {"CANCELLED", "COMPLETED", "FAILED"}) == "CANCELLED"
    assert job_field(job, "Restarts") == "0" and job_field(job, "JobState") == "CANCELLED"
    stopped = [r for r in read_metrics(out) if r["event"] == "stopped"]
    assert len(stopped) == 1 and "SIGTERM" in stopped[0]["reason"]
    assert not (out / "model.h5").exists()


def test_a_second_job_on_a_running_jobs_folder_is_refused(tmp_path):
    write_data(tmp_path / "d.h5")
    write_config(tmp_path / "run.toml", CONFIG, {"optim": {"steps": 40000},
                                                 "run": {"out": "shared"}})
    first = sbatch(tmp_path, "-n", "2", str(ROOT / "jobs" / "train.sbatch"), "run.toml")
    try:
        wait_for_checkpoint(tmp_path / "shared")
        second = sbatch(tmp_path, "-n", "1", str(ROOT / "jobs" / "train.sbatch"), "run.toml")
        assert wait_for(second, {"COMPLETED", "FAILED", "CANCELLED"}) == "FAILED"
        log = (tmp_path / f"slurm-mpifed-{second}.out").read_text()
        assert log.count("mpifed: error") == 1 and f"SLURM job {first}" in log
        assert job_field(first, "JobState") == "RUNNING"  # the holder goes on
    finally:
        subprocess.run(["scancel", first])
    wait_for(first, {"CANCELLED", "COMPLETED", "FAILED"})


def test_the_sites_default_plugin_for_an_mpi_that_needs_another_is_refused(tmp_path):
    # MpiDefault=none: each PyPI-MPICH task starts alone; they stop before writing anything
    write_data(tmp_path / "d.h5")
    write_run(tmp_path / "run.toml", 300)
    job = sbatch(tmp_path, "-n", "2", str(ROOT / "jobs" / "train.sbatch"), "run.toml",
                 MPIFED_SRUN_MPI="")
    assert wait_for(job, {"COMPLETED", "FAILED", "CANCELLED"}) == "FAILED"
    log = (tmp_path / f"slurm-mpifed-{job}.out").read_text()
    assert log.count("mpifed: error") == 1, log
    assert "started 2 tasks" in log and "but MPI sees 1 rank" in log and "--mpi" in log
    assert not (tmp_path / "runs" / f"mpifed-{job}").exists()
