"""examples/slurm/submit.sh under the local SLURM (make test-slurm starts it): the job completes,
and the model it wrote scores the accuracy the job's log printed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, read_metrics
from slurm.test_slurm import VENV, slurm_reason

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(bool(slurm_reason()), reason=slurm_reason() or "ok"),
              pytest.mark.timeout(400)]


def test_the_slurm_example_submits_waits_and_reports(tmp_path):
    pytest.importorskip("sklearn")
    env = dict(os.environ, MPIFED_VENV=VENV, MPIFED_SRUN_MPI="pmi2", OMP_NUM_THREADS="1", RANKS="2",
               MPIFED=f"{sys.executable} -m mpifed", SBATCH_ARGS="--export=ALL")
    done = subprocess.run([str(ROOT / "examples" / "slurm" / "submit.sh")], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=380)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    job = re.search(r"job (\d+) done", done.stdout).group(1)
    summary = read_metrics(Path(tmp_path) / f"runs/mpifed-{job}", "summary")[0]
    evaluated = float(re.search(r"accuracy (\d\.\d+)", done.stdout).group(1))
    assert summary["world_size"] == 2
    assert evaluated == pytest.approx(summary["accuracy"], abs=2e-4) and evaluated > 0.8
