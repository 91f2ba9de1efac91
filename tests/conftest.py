"""Shared fixtures; helpers are in helpers.py.

MPI tests run under `mpiexec -n N python -m pytest --with-mpi -m mpi`.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
import time

import numpy as np
import pytest

# Helpers live in helpers.py; these names stay importable from conftest for tests written before.
from helpers import ROOT, mpiexec, run_cli, run_mpi  # noqa: F401
from helpers import write_dataset as write_site  # noqa: F401


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


HYDRA_LEFTOVERS = "/tmp/hydra_hwloc_xmlfile_*"  # MPICH's mpiexec ignores TMPDIR for these


def pytest_configure(config):
    """Keep the measured "auto" cache (mpifed/train/allreduce_choice.py) of this session, and
    of every run it launches, out of the user's cache folder; note hydra's files already there."""
    folder = tempfile.mkdtemp(prefix="mpifed-test-cache-")
    config._mpifed_cache = folder
    config._hydra_before = set(glob.glob(HYDRA_LEFTOVERS))
    os.environ["XDG_CACHE_HOME"] = folder


def pytest_unconfigure(config):
    folder = getattr(config, "_mpifed_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)
    remove_hydra_leftovers(getattr(config, "_hydra_before", None))


def remove_hydra_leftovers(before) -> None:
    """Remove the topology files that this session's aborted jobs left in /tmp (an mpiexec that
    ends in MPI_Abort never deletes its own): only files made during the session, at least 5 s
    old and open in no process, so a job of another session still starting keeps its file."""
    if before is None or "PMI_RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return  # a rank under mpiexec: its own launcher's file is in use
    made = set(glob.glob(HYDRA_LEFTOVERS)) - before
    if not made:
        return
    in_use = set()
    for fd_dir in glob.glob("/proc/[0-9]*/fd"):
        try:
            in_use.update(os.path.realpath(os.path.join(fd_dir, fd)) for fd in os.listdir(fd_dir))
        except OSError:
            continue
    for path in made - in_use:
        try:
            if time.time() - os.path.getmtime(path) >= 5:
                os.remove(path)
        except OSError:
            pass


@pytest.fixture(autouse=True)
def _no_mpi_half(request):
    """Under the no_mpi_half mark: MPIFED_MPI_HALF=0, so MPI sums 16-bit floats by our user
    operation over raw words, the path Open MPI (no half type) always takes."""
    if request.node.get_closest_marker("no_mpi_half") is None:
        yield
        return
    from mpifed.comm.datatypes import mpi_sums

    mp = pytest.MonkeyPatch()
    mp.setenv("MPIFED_MPI_HALF", "0")
    mpi_sums.cache_clear()
    yield
    mp.undo()
    mpi_sums.cache_clear()


@pytest.fixture(params=BACKENDS)
def xp(request):
    """Each array backend present: numpy always, cupy where a GPU is."""
    return request.param


@pytest.fixture
def emulated_nodes(monkeypatch, request):
    """A fresh duplicate of COMM_WORLD whose 'nodes' are blocks of `request.param` ranks
    (MPIFED_RANKS_PER_NODE; use with parametrize(..., indirect=True))."""
    from mpi4py import MPI

    monkeypatch.setenv("MPIFED_RANKS_PER_NODE", str(request.param))
    comm = MPI.COMM_WORLD.Dup()
    yield comm
    comm.Free()
