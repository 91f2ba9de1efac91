"""The Python API as a user meets it: `mpifed --version`, `import mpifed` in a fresh
interpreter, and `mpifed.train.run` with arrays, a model object and callbacks on 2 and 3 ranks,
equal to the same run from a file."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import (
    LAUNCH_TIMEOUT,
    ROOT,
    assert_same_bits,
    make_classification,
    mpiexec,
    read_metrics,
    run_cli,
    run_mpi,
    run_script,
    write_config,
    write_dataset,
)

import mpifed


def test_version_prints_the_package_version():
    done = run_cli(["--version"])
    assert done.returncode == 0 and done.stdout == f"mpifed {mpifed.__version__}\n"


def test_import_mpifed_exposes_train_and_config_without_starting_mpi():
    code = ("import sys, mpifed\n"
            "alone = 'mpi4py.MPI' in sys.modules\n"
            "assert callable(mpifed.train.run) and mpifed.config.Config and mpifed.nn.Sequential\n"
            "print(alone, 'mpi4py.MPI' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]


SCRIPT = """
import json
import numpy as np
from mpi4py import MPI
import mpifed
from mpifed.nn import Linear, Sequential, Tanh

comm = MPI.COMM_WORLD
x, y = np.load("x.npy"), np.load("y.npy")
lo, hi = (comm.rank * len(y)) // comm.size, ((comm.rank + 1) * len(y)) // comm.size
steps = []
summary = mpifed.train.run(
    {"optim": OPTIM, "run": {"seed": 7, "out": "arrays", "progress": "none"}},
    data=(x[lo:hi], y[lo:hi]), test=(x[lo:hi], y[lo:hi]),
    model=Sequential([Linear(6), Tanh(), Linear(3)], (5,), 3),
    callbacks=[lambda record: steps.append(record._asdict())])
json.dump({"summary": summary, "steps": steps, "typed": type(summary).__name__,
           "rate": summary.samples_per_s}, open(f"result-{comm.rank}.json", "w"))
"""


@pytest.mark.parametrize("ranks", [2, 3])
def test_arrays_and_a_model_object_equal_the_file_run(tmp_path, ranks):
    x, y = make_classification(61, seed=9, features=5, dtype="float32")  # odd: unequal shards
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    optim = {"steps": 17, "batch_size": 4, "momentum": 0.9, "lr": 0.05}
    done = run_script(ranks, SCRIPT.replace("OPTIM", repr(optim)), tmp_path)
    assert done.returncode == 0, done.stderr
    # The same rows as one file (rank 0's shard, then rank 1's), the same model from [model].
    assert run_cli(["data", "from-numpy", "x.npy", "y.npy", "d.h5"], cwd=tmp_path).returncode == 0
    write_config(tmp_path / "run.toml", {
        "data": {"train": "d.h5", "test": "d.h5"},
        "model": {"kind": "sequential", "layers": [{"type": "linear", "out": 6},
                                                   {"type": "tanh"},
                                                   {"type": "linear", "out": 3}]},
        "optim": optim, "run": {"seed": 7, "out": "file", "progress": "none"}})
    file_run = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path)
    assert file_run.returncode == 0, file_run.stderr
    assert_same_bits(tmp_path / "arrays" / "model.h5", tmp_path / "file" / "model.h5")
    want = read_metrics(tmp_path / "file")[-1]
    for rank in range(ranks):
        got = json.loads((tmp_path / f"result-{rank}.json").read_text())
        assert got["typed"] == "Summary" and got["rate"] == got["summary"]["samples_per_s"]
        for key in ("loss", "accuracy", "test_loss", "steps", "samples"):
            assert got["summary"][key] == want[key], key
        assert [s["step"] for s in got["steps"]] == list(range(1, 18))
        assert got["steps"][-1]["loss"] == want["loss"] and got["steps"][-1]["lr"] == 0.05
    recorded = (tmp_path / "arrays" / "config.toml").read_text()
    assert 'train = "<arrays>"' in recorded and 'test = "<arrays>"' in recorded


def test_the_api_page_example_script_runs(tmp_path):
    script = ROOT / "examples" / "train_arrays.py"
    done = subprocess.run([mpiexec(), "-n", "2", sys.executable, str(script), "--steps", "20",
                           "--out", "out"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    assert "test accuracy" in done.stdout and (tmp_path / "out" / "model.h5").exists()
    page = ROOT / "docs" / "reference" / "api.md"
    assert script.read_text() in page.read_text()  # the Python API page shows it whole


FEDERATED = """
import json
from mpi4py import MPI
import mpifed

seen = []
summary = mpifed.train.run("fed.toml", callbacks=[lambda rnd, record: seen.append(
    [rnd, type(record).__name__, record.get("round")])])
json.dump({"seen": seen, "rounds": summary.rounds},
          open(f"rounds-{MPI.COMM_WORLD.rank}.json", "w"))
"""


def test_callbacks_see_every_round_of_a_federation(tmp_path):
    write_dataset(tmp_path / "d.h5", 40, seed=9)
    write_config(tmp_path / "fed.toml", {
        "data": {"train": "d.h5", "test": "d.h5"}, "optim": {"batch_size": 2},
        "federated": {"institutions": 2, "rounds": 3, "local_steps": 2},
        "run": {"out": "out", "progress": "none"}})
    done = run_script(2, FEDERATED, tmp_path)
    assert done.returncode == 0, done.stderr
    rounds = [r["round"] for r in read_metrics(tmp_path / "out", "round")]
    for rank in range(2):
        got = json.loads((tmp_path / f"rounds-{rank}.json").read_text())
        assert [s[:2] for s in got["seen"]] == [[1, "dict"], [2, "dict"], [3, "dict"]]
        assert got["rounds"] == 3 and [s[2] for s in got["seen"]] == rounds


FAILING = """
import numpy as np
from mpi4py import MPI
import mpifed

rank = MPI.COMM_WORLD.rank
rng = np.random.default_rng(rank)
y = rng.integers(0, 2, 20)

def stop_at_three(record):
    if rank == 1 and record.step == 3:
        raise RuntimeError("seen enough")

mpifed.train.run({"optim": {"steps": 10, "batch_size": 2}, "run": {"out": "out"}},
                 data=(rng.standard_normal((20, 3)) + y[:, None], y), callbacks=[stop_at_three])
"""


def test_a_callback_that_raises_on_one_rank_stops_every_rank(tmp_path):
    done = run_script(2, FAILING, tmp_path, timeout=120)
    assert done.returncode != 0
    assert "[rank 1] callbacks[0] ('stop_at_three') raised RuntimeError: seen enough" in \
        done.stderr
    assert not (tmp_path / "out" / "model.h5").exists()
