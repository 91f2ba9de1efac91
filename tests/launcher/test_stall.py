"""A rank that stops answering ends the job with the late ranks named, instead of a hang."""

import h5py
import numpy as np
from conftest import run_mpi

from mpifed.comm.stall import STALL_EXIT

RUN = """
[data]
train = "d.h5"
[optim]
batch_size = 4
steps = 100000
[comm]
stall_timeout = 2
[run]
out = "out"
log_every = 0
"""


def test_a_stopped_rank_is_named_and_the_job_aborts(tmp_path):
    rng = np.random.default_rng(0)
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        fh["x"], fh["y"] = rng.standard_normal((120, 3)), rng.integers(0, 3, 120)
    (tmp_path / "run.toml").write_text(RUN)
    done = run_mpi(3, ["train", "run.toml"], cwd=tmp_path, timeout=90,
                   env={"MPIFED_FAULT": "stop:step=5:rank=1"})
    assert done.returncode == STALL_EXIT, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if "stall" in line]
    assert len(lines) == 1, done.stderr
    assert "rank 1 of 3 did not arrive in the all-reduce of step 6" in lines[0]
    assert "0 (step 6), 2 (step 6)" in lines[0] and "comm.stall_timeout = 2 s" in lines[0]
