"""Shared fixtures. MPI tests run under `mpiexec -n N python -m pytest --with-mpi -m mpi`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mpifed.launch import mpiexec_path as mpiexec  # the mpiexec beside this Python, else PATH's

ROOT = Path(__file__).resolve().parents[1]


def _backends():
    params = [pytest.param(np, id="numpy")]
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            params.append(pytest.param(cupy, id="cupy", marks=pytest.mark.gpu))
    except Exception:
        params.append(pytest.param(None, id="cupy", marks=pytest.mark.skip(
            reason="CuPy or a CUDA device is missing (GPU tests run only on a GPU machine)")))
    return params


BACKENDS = _backends()


@pytest.fixture(params=BACKENDS)
def xp(request):
    """Each array backend present: numpy always, cupy where a GPU is."""
    return request.param


def run_mpi(n: int, args: list[str], timeout: float = 120, cwd=None, env=None):
    """Run `mpiexec -n n python -m mpifed ARGS`; return the CompletedProcess (never hangs)."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full_env.update(env or {})
    cmd = [mpiexec(), "-n", str(n), sys.executable, "-m", "mpifed", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=full_env)


def run_cli(args: list[str], timeout: float = 120, cwd=None):
    """Run `python -m mpifed ARGS` as one process, without mpiexec."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "mpifed", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env=env)


def write_site(path, samples: int, seed: int, features: int = 5, classes: int = 3):
    """Write a small learnable classification file (x float64, y int) and return (x, y)."""
    import h5py

    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, size=samples)
    x = rng.standard_normal((samples, features)) + 0.7 * y[:, None]
    with h5py.File(path, "w") as fh:
        fh["x"], fh["y"] = x, y
        fh.attrs["num_classes"] = classes
    return x, y
