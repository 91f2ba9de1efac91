"""User errors end every rank with one clear line, no traceback, a non-zero exit, and no hang."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import run_cli, run_mpi, run_script, write_config, write_h5

GOOD = {"data": {"train": "d.h5"}, "optim": {"batch_size": 4, "steps": 3}, "run": {"out": "out"}}


def write_data(path, samples=40, features=3, labels=None, x=None, y_name="y", attrs=None):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((samples, features)) if x is None else x
    labels = rng.integers(0, 3, size=samples) if labels is None else labels
    write_h5(path, attrs, **{"x": x, y_name: labels})


def assert_one_clear_error(done, *needles):
    """Assert exit code 1 and exactly one error line naming every needle, no traceback."""
    assert done.returncode == 1, (done.returncode, done.stdout)
    errors = [line for line in done.stderr.splitlines() if line.startswith("mpifed: error")]
    assert len(errors) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


CASES = {  # config layers over GOOD, data writer arguments, what the error names
    "unknown key": ({"run": {"bogus": 1}}, None, ["run.bogus"]),
    "wrong type": ({"optim": {"batch_size": "four"}}, None, ["optim.batch_size"]),
    "missing file": ({"data": {"train": "nope.h5"}}, None, ["data.train", "nope.h5"]),
    "missing dataset": ({}, {"y_name": "labels"}, ["no dataset 'y'", "data.y"]),
    "x/y length mismatch": ({}, {"labels": np.zeros(39, dtype=np.int64)}, ["40 rows", "39"]),
    "label out of range": ({}, {"labels": np.r_[np.zeros(39, np.int64), [7]],
                                "attrs": {"num_classes": 3}}, ["label 7", "num_classes=3"]),
    "nan in data": ({}, {"x": np.r_[np.ones((39, 3)), [[np.nan, 0, 0]]]}, ["NaN"]),
    "batch larger than shard": ({"optim": {"batch_size": 400}}, None,
                                ["optim.batch_size", "smallest shard"]),
    "unknown model": ({"model": {"kind": "transformer"}}, None, ["model.kind"]),
    "unknown strategy": ({"federated": {"institutions": 1, "strategy": "fedsgd"}}, None,
                         ["federated.strategy", "fedsgd"]),
    "x not 2-D": ({}, {"x": np.ones(40)}, ["must be 2-D", "'x'"]),
    "divergence": ({"optim": {"steps": 50, "lr": 1e30}, "model": {"kind": "mlp", "hidden": [4]}},
                   None, ["diverged", "step"]),
}


@pytest.mark.parametrize("ranks", [1, 2, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_user_errors(tmp_path, ranks, case):
    config, data_kwargs, needles = CASES[case]
    write_data(tmp_path / "d.h5", **(data_kwargs or {}))
    write_config(tmp_path / "run.toml", GOOD, config)
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path)
    assert_one_clear_error(done, *needles)
    if case == "label out of range" and ranks > 1:
        assert f"[rank {ranks - 1}]" in done.stderr  # only the last rank holds the bad row


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_test_set_with_more_classes_than_the_model(tmp_path, ranks):
    write_data(tmp_path / "d.h5")  # labels 0..2
    write_data(tmp_path / "t.h5", labels=np.arange(40) % 5)  # labels 0..4
    write_config(tmp_path / "run.toml", GOOD, {"data": {"test": "t.h5"}})
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path)
    assert_one_clear_error(done, "data.test", "labels up to 4")


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_corrupt_hdf5_file(tmp_path, ranks):
    (tmp_path / "d.h5").write_bytes(b"not an HDF5 file at all" * 100)
    write_config(tmp_path / "run.toml", GOOD)
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path)
    assert_one_clear_error(done, "not a readable HDF5 file", "d.h5")


def test_debug_shows_the_traceback(tmp_path):
    write_config(tmp_path / "run.toml", GOOD, {"data": {"train": "nope.h5"}})
    done = run_cli(["--debug", "train", "run.toml"], cwd=tmp_path)
    assert done.returncode != 0 and "Traceback" in done.stderr


def test_missing_config_and_missing_model(tmp_path):
    assert_one_clear_error(run_cli(["train", "nothing.toml"], cwd=tmp_path), "nothing.toml")
    write_data(tmp_path / "d.h5")
    assert_one_clear_error(run_mpi(2, ["evaluate", "m.h5", "d.h5"], cwd=tmp_path), "m.h5")


def test_help_answers():
    done = run_cli(["train", "--help"])
    assert done.returncode == 0 and "--set" in done.stdout


@pytest.mark.parametrize("where", ["main", "thread"])
def test_abort_hook_ends_every_rank_of_a_library_script(tmp_path, where):
    # The script is what is under test: a user's own program that imports mpifed.
    fail = ("raise RuntimeError('rank 1 fails alone')" if where == "main" else
            "t = threading.Thread(target=fail); t.start(); t.join()")
    script = ("import mpifed; mpifed.abort_on_exception()\n"
              "import threading\n"
              "from mpi4py import MPI\n"
              "def fail():\n"
              "    raise RuntimeError('rank 1 fails alone')\n"
              "comm = MPI.COMM_WORLD\n"
              "if comm.rank == 1:\n"
              f"    {fail}\n"
              "comm.Barrier()  # the others would wait here forever without the hook\n")
    done = run_script(3, script, tmp_path)
    assert done.returncode == 3 and "rank 1 fails alone" in done.stderr  # MPI_Abort(3)
