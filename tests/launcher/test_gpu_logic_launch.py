"""The GPU check script without a GPU says so and passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_the_gpu_check_without_a_gpu_says_so_and_passes(tmp_path):
    """`make test-gpu` (tests/gpu/run.sh) on a machine without CuPy or a GPU: exit 0, one line."""
    probe = "import cupy; assert cupy.cuda.runtime.getDeviceCount() > 0"
    if subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0:
        pytest.skip("a GPU is here: run.sh would run the whole check")
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(["bash", str(root / "tests" / "gpu" / "run.sh")], cwd=tmp_path,
                          env={**os.environ, "PYTHON": sys.executable,
                               "MPIFED_SITE": str(tmp_path / "site")},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("no GPU: skipped")
