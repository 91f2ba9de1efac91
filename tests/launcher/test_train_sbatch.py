"""jobs/train.sbatch's choice of run folder, with srun and mpiexec stubbed (no SLURM needed).

The user's run.out (in the config or a --set) wins; only without one does the job send the run
to runs/<job name>-<job id>; the first output line says which folder is used. The real job runs
are in test_slurm.py.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

STUB = """#!/bin/bash
printf '%s\\n' "$@" > "$CALLS"
"""


@pytest.fixture
def job(tmp_path):
    """Return run(config_text, *args, **env) -> (first output line, launcher argv)."""
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name in ("srun", "mpiexec"):
        (stubs / name).write_text(STUB)
        (stubs / name).chmod(0o755)
    (stubs / "python").symlink_to(sys.executable)
    venv = tmp_path / "venv" / "bin"
    venv.mkdir(parents=True)
    (venv / "activate").write_text(f'export PATH="{stubs}:$PATH"\n')

    def run(config_text, *args, **env):
        if config_text is not None:
            (tmp_path / "run.toml").write_text('[data]\ntrain = "d.h5"\n' + config_text)
        calls = tmp_path / "calls.txt"
        full_env = dict(os.environ, MPIFED_VENV=str(tmp_path / "venv"), SLURM_JOB_ID="42",
                        SLURM_JOB_NAME="mpifed", SLURM_NTASKS="2", CALLS=str(calls),
                        PYTHONPATH=str(ROOT), **env)
        done = subprocess.run(["bash", str(ROOT / "jobs" / "train.sbatch"), "run.toml", *args],
                              cwd=tmp_path, env=full_env, capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout.splitlines()[0], calls.read_text().splitlines()
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
