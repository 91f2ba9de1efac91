"""`mpifed data from-numpy` from the command line: a round trip read back by `mpifed data
inspect`, an .npz input, and its refusals."""

from __future__ import annotations

import h5py
import numpy as np
from helpers import make_classification, run_cli, run_mpi


def test_from_numpy_round_trip_and_refusals(tmp_path):
    x, y = make_classification(50, seed=3, features=7, dtype="float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    done = run_cli(["data", "from-numpy", "x.npy", "y.npy", "o.h5"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "50 samples x 7 float32, 3 classes" in done.stdout
    shown = run_cli(["data", "inspect", "o.h5"], cwd=tmp_path)
    assert "attribute num_classes = 3" in shown.stdout
    assert "dataset x: shape (50, 7), dtype float32" in shown.stdout
    with h5py.File(tmp_path / "o.h5") as fh:
        assert np.array_equal(fh["x"][...], x) and np.array_equal(fh["y"][...], y)
    again = run_cli(["data", "from-numpy", "x.npy", "y.npy", "o.h5"], cwd=tmp_path)
    assert again.returncode == 1 and "add --force" in again.stderr
    npz = run_cli(["data", "from-numpy", "--npz", "d.npz", "n.h5", "--num-classes", "4"],
                  cwd=tmp_path)
    assert npz.returncode == 0, npz.stderr
    with h5py.File(tmp_path / "n.h5") as fh:
        assert fh.attrs["num_classes"] == 4 and np.array_equal(fh["x"][...], x)
    np.save(tmp_path / "short.npy", y[:10])
    short = run_cli(["data", "from-numpy", "x.npy", "short.npy", "s.h5"], cwd=tmp_path)
    assert short.returncode == 1
    assert "'x.npy' has 50 rows but 'short.npy' has 10 labels" in short.stderr
    wrong = run_cli(["data", "from-numpy", "x.npy", "s.h5"], cwd=tmp_path)
    assert wrong.returncode == 1 and "give X.npy Y.npy OUT.h5" in wrong.stderr
    assert not (tmp_path / "s.h5").exists()


def test_a_config_written_by_an_array_run_names_the_arrays_not_a_missing_file(tmp_path):
    """OUT/config.toml of a mpifed.train.run(data=...) run says data.train = "<arrays>";
    `mpifed train` on it explains that, instead of "file '<arrays>' does not exist"."""
    (tmp_path / "run.toml").write_text('[data]\ntrain = "<arrays>"\n')
    done = run_mpi(2, ["train", "run.toml"], cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "written by a run given arrays from Python" in errors[0]
    assert "does not exist" not in done.stderr
