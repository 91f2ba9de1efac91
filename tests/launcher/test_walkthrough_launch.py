"""The new user's first hour, followed from the docs alone: Getting started's "Your own data on
2 ranks" section run as written (its shell lines with `.venv/bin` pointing at this environment,
its TOML block as run.toml) on NumPy arrays of one's own; the model it trains beats chance, and
`mpifed evaluate` and `mpifed plot --run` work on what it wrote. The SLURM step that follows in
the docs is examples/slurm/submit.sh, run by tests/slurm/test_slurm_example.py."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import LAUNCH_TIMEOUT, ROOT, read_metrics

pytestmark = pytest.mark.timeout(600)
PAGE = ROOT / "docs" / "getting-started.md"


def section_blocks(title: str) -> dict[str, list[str]]:
    """Return the fenced blocks of the page's section `title`, by language."""
    text = PAGE.read_text().split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks: dict[str, list[str]] = {}
    for language, body in re.findall(r"```(\w+)\n(.*?)```", text, flags=re.S):
        blocks.setdefault(language, []).append(body)
    return blocks


def test_own_numpy_arrays_on_two_ranks_as_the_docs_say(tmp_path):
    blocks = section_blocks("Your own data on 2 ranks")
    (tmp_path / "run.toml").write_text(blocks["toml"][0])
    rng = np.random.default_rng(0)  # "your" data: 3 classes, each a shifted Gaussian blob
    y = rng.integers(0, 3, 1200)
    x = (rng.standard_normal((1200, 8)) + 2.0 * y[:, None]).astype(np.float32)
    np.save(tmp_path / "X.npy", x)
    np.save(tmp_path / "Y.npy", y)
    bin_dir = Path(sys.executable).parent
    outputs = []
    for line in blocks["sh"][0].splitlines():
        command = line.split("#")[0].strip()
        if not command:
            continue
        argv = [str(bin_dir / a.removeprefix(".venv/bin/")) if a.startswith(".venv/bin/") else a
                for a in shlex.split(command)]
        # Python's copy of the environment, as the suite's helpers pass: a test that started
        # MPI in this process leaves Open MPI's PMIX_/OMPI_ variables in the C environment,
        # and an mpirun started with them takes itself for a nested job and exits 1
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT, env=dict(os.environ))
        assert done.returncode == 0, f"{command}: {done.stderr[-2000:]}"
        outputs.append(done.stdout)
    summary = read_metrics(tmp_path / "runs" / "latest", "summary")[0]
    assert summary["world_size"] == 2
    evaluated = float(re.search(r"accuracy (\d\.\d+)", "".join(outputs)).group(1))
    assert evaluated > 0.8  # chance is 1/3; the blobs are 2 standard deviations apart
    if "plot --run" in blocks["sh"][0]:
        assert (tmp_path / "runs" / "latest" / "loss.png").is_file()
