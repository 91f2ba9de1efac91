"""The job scripts (jobs/*.sbatch) with srun, mpiexec and scontrol stubbed (no SLURM needed).

jobs/train.sbatch's choice of run folder: the user's run.out (in the config or a --set) wins;
only without one does the job send the run to runs/<job name>-<job id>; the first output line
says which folder is used. Then the lines a site guide asks for: the site's srun MPI plugin
unless MPIFED_SRUN_MPI names one, set-up that stops at its first failure, a requeue on USR1
only (a plain scancel's TERM ends the job), scaling's rank counts inside the allocation, and the
GPU script running train.sbatch. The real job runs are in tests/slurm/test_slurm.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from conftest import ROOT

# A launcher stub: its arguments into $CALLS (and appended to $CALLS.all, calls apart by "--");
# with $STUB_WAIT set it announces itself there and runs until USR1 or TERM, which it records.
STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$CALLS"
{ printf '%s\\n' "$@"; echo --; } >> "$CALLS.all"
if [ -n "${STUB_WAIT:-}" ]; then
  trap 'echo USR1 > "$STUB_WAIT.got"; exit 0' USR1
  trap 'echo TERM > "$STUB_WAIT.got"; exit 0' TERM
  touch "$STUB_WAIT"
  while true; do sleep 0.05; done
fi
"""
SCONTROL = """#!/bin/bash
printf '%s\\n' "$*" >> "$CALLS.scontrol"
"""
SITE_LINES = ("--time", "--account", "--partition", "--cpus-per-task", "--gpus-per-task")


@pytest.fixture
def stubbed(tmp_path):
    """Return the environment a job script runs in here: a venv whose activation puts the
    stubs first on PATH, and SLURM's variables of a 2-task job 42."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("srun", STUB), ("mpiexec", STUB), ("scontrol", SCONTROL)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    (stubs / "python").symlink_to(sys.executable)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'export PATH="{stubs}:$PATH"\n')
    (tmp_path / "run.toml").write_text('[data]\ntrain = "d.h5"\n')
    return dict(os.environ, MPIFED_VENV=str(tmp_path / "venv"), SLURM_JOB_ID="42",
                SLURM_JOB_NAME="mpifed", SLURM_NTASKS="2", CALLS=str(tmp_path / "calls.txt"),
                PYTHONPATH=str(ROOT))


def run_script(name: str, cwd, env: dict, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "jobs" / name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=60)


def launches(env: dict) -> list[list[str]]:
    """Every stubbed srun/mpiexec call's arguments, in order."""
    text = open(env["CALLS"] + ".all").read()
    return [call.strip("\n").split("\n") for call in text.split("--\n") if call.strip()]


@pytest.fixture
def job(tmp_path, stubbed):
    """Return run(config_text, *args, **env) -> (first output line, launcher argv)."""
    def run(config_text, *args, **env):
        if config_text is not None:
            (tmp_path / "run.toml").write_text('[data]\ntrain = "d.h5"\n' + config_text)
        else:
            (tmp_path / "run.toml").unlink(missing_ok=True)
        done = run_script("train.sbatch", tmp_path, dict(stubbed, **env), "run.toml", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()[0], open(stubbed["CALLS"]).read().splitlines()
    return run


def test_without_run_out_the_job_folder_is_used(job):
    first, argv = job("")
    assert "out runs/mpifed-42 (job folder" in first
    assert argv[-4:] == ["train", "run.toml", "--set", 'run.out="runs/mpifed-42"']


def test_the_configs_run_out_is_kept(job):
    first, argv = job('[run]\nout = "my runs/a"\n', "--set", "optim.lr=0.5")
    assert "out my runs/a (run.out from run.toml or --set)" in first
    assert argv[-4:] == ["train", "run.toml", "--set", "optim.lr=0.5"]


@pytest.mark.parametrize("config", ["", '[run]\nout = "mine"\n'])
def test_a_set_run_out_wins(job, config):
    first, argv = job(config, "--set", "run.out=cli", "--debug")
    assert "out cli (run.out from" in first
    assert argv[-5:] == ["train", "run.toml", "--set", "run.out=cli", "--debug"]


def test_mpifed_out_moves_the_job_folder_only(job):
    first, argv = job("", MPIFED_OUT="elsewhere", MPIFED_LAUNCHER="mpiexec")
    assert "out elsewhere (job folder" in first
    assert argv[:2] == ["-n", "2"] and argv[-1] == 'run.out="elsewhere"'
    first, _ = job('[run]\nout = "mine"\n', MPIFED_OUT="elsewhere")
    assert "out mine (run.out from" in first


def test_an_unreadable_config_is_left_to_mpifed_train(job, tmp_path):
    first, argv = job(None)  # no run.toml: mpifed train reports it, once
    assert "out runs/mpifed-42 (job folder" in first
    assert argv[-3:-1] == ["run.toml", "--set"]


def test_srun_takes_the_sites_mpi_plugin_unless_told(job):
    _, argv = job("")
    assert not [a for a in argv if a.startswith("--mpi")]  # slurm.conf's MpiDefault decides
    _, argv = job("", MPIFED_SRUN_MPI="pmix")
    assert argv[0] == "--mpi=pmix"


def test_a_failed_set_up_ends_the_job_before_any_launch(tmp_path, stubbed):
    (tmp_path / "venv" / "bin" / "activate").write_text("false\n")  # a module load that fails
    done = run_script("train.sbatch", tmp_path, stubbed, "run.toml")
    assert done.returncode == 1
    assert not os.path.exists(stubbed["CALLS"])  # srun never ran


def start_waiting(tmp_path, env: dict, name: str = "train.sbatch") -> subprocess.Popen:
    """Start a job script whose srun stub runs until signalled; return once srun runs."""
    ready = tmp_path / "srun-started"
    proc = subprocess.Popen(["bash", str(ROOT / "jobs" / name), "run.toml"], cwd=tmp_path,
                            env=dict(env, STUB_WAIT=str(ready)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the srun stub did not start"
        time.sleep(0.02)
    return proc


@pytest.mark.parametrize("name", ["train.sbatch", "train-gpu.sbatch"])
def test_usr1_checkpoints_and_requeues(tmp_path, stubbed, name):
    proc = start_waiting(tmp_path, dict(stubbed, MPIFED_JOBS=str(ROOT / "jobs")), name)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@120 sends before the time limit
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert (tmp_path / "srun-started.got").read_text() == "USR1\n"  # passed to the ranks
    assert open(stubbed["CALLS"] + ".scontrol").read() == "requeue 42\n"
    assert "requeueing job 42" in out


def test_a_plain_scancel_ends_the_job_without_requeue(tmp_path, stubbed):
    proc = start_waiting(tmp_path, stubbed)
    proc.send_signal(signal.SIGTERM)  # what a plain `scancel JOBID` sends the batch script
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert (tmp_path / "srun-started.got").read_text() == "TERM\n"  # the ranks checkpoint
    assert not os.path.exists(stubbed["CALLS"] + ".scontrol")  # no requeue
    assert "stopped by TERM (scancel): not requeued" in out
    assert "--set run.out='\"runs/mpifed-42\"'" in out  # how to resume in the same folder


@pytest.mark.parametrize("tasks,counts", [("1", ["1"]), ("2", ["1", "2"]),
                                          ("6", ["1", "2", "4", "6"]),
                                          ("8", ["1", "2", "4", "8"])])
def test_scaling_rank_counts_fit_the_allocation(tmp_path, stubbed, tasks, counts):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scaling.csv").write_text("ranks\n")
    (tmp_path / "out" / "bench.h5").write_text("")  # the data exist: no synth step
    done = run_script("scaling.sbatch", tmp_path, dict(stubbed, SLURM_NTASKS=tasks,
                                                        MPIFED_OUT="out"), "--steps", "5")
    assert done.returncode == 0, done.stderr
    calls = launches(stubbed)
    assert [c[1] for c in calls] == counts and all(c[0] == "-n" for c in calls)
    assert all(c[-2:] == ["--steps", "5"] for c in calls)


def sbatch_lines(name: str) -> list[str]:
    return [line for line in (ROOT / "jobs" / name).read_text().splitlines()
            if re.match(r"#+SBATCH ", line)]


@pytest.mark.parametrize("name,commented", [
    ("train.sbatch", SITE_LINES),
    ("scaling.sbatch", SITE_LINES[:4]),
    ("train-gpu.sbatch", SITE_LINES[:4])])
def test_the_site_lines_are_there_commented(name, commented):
    lines = sbatch_lines(name)
    for option in commented:
        assert any(line.startswith(f"##SBATCH {option}=") for line in lines), option
    assert all(line.startswith(("#SBATCH ", "##SBATCH ")) for line in lines)


def test_scaling_is_exclusive_and_the_gpu_job_gives_each_rank_one_gpu():
    assert "#SBATCH --exclusive" in sbatch_lines("scaling.sbatch")
    gpu = sbatch_lines("train-gpu.sbatch")
    assert "#SBATCH --gpus-per-task=1" in gpu and "#SBATCH --signal=B:USR1@120" in gpu
