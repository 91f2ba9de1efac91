"""`mpifed data ...` run alone never starts MPI (a login node may have no working MPI, and Open
MPI starts a helper daemon for a lone process, seconds per command); under mpiexec rank 0 does
the work once while the other ranks wait."""

from __future__ import annotations

import os
import subprocess
import sys

import h5py
from helpers import run_mpi

from mpifed.train.launch_check import LAUNCHER_SIZES, SLURM_SIZES, TASK_RANKS

PROBE = """
import sys
from mpifed.cli.main import main
code = main(sys.argv[1:])
print("MPI started:", "mpi4py.MPI" in sys.modules)
raise SystemExit(code)
"""


def alone(args, cwd):
    """Run the CLI in one process with no launcher's variables; return the CompletedProcess."""
    env = {k: v for k, v in os.environ.items()
           if k not in (*LAUNCHER_SIZES, *SLURM_SIZES, *TASK_RANKS)}
    return subprocess.run([sys.executable, "-c", PROBE, *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


def test_data_commands_alone_never_start_mpi(tmp_path):
    done = alone(["data", "synth", "s.h5", "--samples", "50", "--features", "3",
                  "--classes", "2"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "MPI started: False" in done.stdout
    with h5py.File(tmp_path / "s.h5") as fh:
        assert fh["x"].shape == (50, 3)
    done = alone(["data", "inspect", "s.h5"], tmp_path)
    assert done.returncode == 0 and "MPI started: False" in done.stdout, done.stderr
    assert "50" in done.stdout


def test_data_command_under_mpiexec_writes_once(tmp_path):
    done = run_mpi(3, ["data", "synth", "s.h5", "--samples", "40", "--features", "2",
                       "--classes", "2"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("wrote") == 1  # rank 0 alone
    with h5py.File(tmp_path / "s.h5") as fh:
        assert fh["x"].shape == (40, 2)
