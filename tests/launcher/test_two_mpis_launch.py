"""The same training run under MPICH and under Open MPI gives the same model bits.

Needs a second Python whose mpi4py is built against the other MPI, named by MPIFED_OTHER_PYTHON
(`make test-openmpi` sets it to .venv's, the PyPI MPICH, while this session runs under Open
MPI); skipped without it. The ring sums in mpifed's own order, so 3 ranks agree bitwise too;
on 2 ranks every algorithm does (a + b is the same sum whichever rank adds).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import LAUNCH_TIMEOUT, ROOT, model_arrays, read_metrics, write_config, write_dataset

from mpifed.launch import mpiexec_path, oversubscribe_args

OTHER = os.environ.get("MPIFED_OTHER_PYTHON")

pytestmark = pytest.mark.skipif(not OTHER, reason="MPIFED_OTHER_PYTHON (a Python with mpi4py "
                                "built against the other MPI) is not set; make test-openmpi sets it")

TRAIN = {
    "data": {"train": "d.h5"},
    "model": {"kind": "mlp", "hidden": [16]},
    "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 8, "steps": 120},
    "run": {"seed": 3, "progress": "none"},
}


def train(python: str, ranks: int, config: Path, cwd: Path) -> subprocess.CompletedProcess:
    """Run `mpifed train config` on `ranks` ranks with `python` and the mpiexec beside it."""
    launcher = str(Path(python).with_name("mpiexec"))
    if not Path(launcher).exists():
        launcher = mpiexec_path()
    cmd = [launcher, "-n", str(ranks), *oversubscribe_args(launcher), python, "-m", "mpifed",
           "train", str(config)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=LAUNCH_TIMEOUT)


@pytest.mark.parametrize("ranks, algorithm", [(2, "auto"), (3, "ring")])
def test_training_gives_the_same_bits_under_both_mpis(tmp_path, ranks, algorithm):
    write_dataset(tmp_path / "d.h5", 900, seed=5)
    libraries = []
    for name, python in (("here", sys.executable), ("other", OTHER)):
        config = write_config(tmp_path / f"{name}.toml", TRAIN,
                              {"comm": {"allreduce": algorithm}, "run": {"out": name}})
        done = train(python, ranks, config, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        [summary] = read_metrics(tmp_path / name, "summary")
        libraries.append(summary["mpi_library"])
    assert libraries[0] != libraries[1], f"both runs used {libraries[0]}"
    here, other = (model_arrays(tmp_path / name / "model.h5") for name in ("here", "other"))
    assert sorted(here) == sorted(other) and here
    for key, array in here.items():
        assert array.dtype == other[key].dtype and array.tobytes() == other[key].tobytes(), key
