"""`mpifed data from-numpy`'s writer, called in-process: the HDF5 contract, row blocks, refusals
that name the file and the fix."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from helpers import make_classification

from mpifed.data.from_numpy import convert, write_from_numpy
from mpifed.data.shards import describe
from mpifed.errors import UserError


def test_from_numpy_writes_the_contract_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr("mpifed.data.from_numpy.BLOCK_BYTES", 3 * 6 * 8)  # 3 rows a block
    x, y = make_classification(20, seed=5, features=6)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y.astype(np.int32))
    seen = []
    done = convert(str(tmp_path / "o.h5"), str(tmp_path / "x.npy"), str(tmp_path / "y.npy"),
                   progress=lambda n, total: seen.append(n))
    assert seen == [3, 6, 9, 12, 15, 18, 20]
    assert (done.samples, done.sample_shape, done.dtype) == (20, (6,), "float64")
    with h5py.File(tmp_path / "o.h5") as fh:
        assert np.array_equal(fh["x"][...], x) and fh["y"].dtype == np.int64
        assert np.array_equal(fh["y"][...], y) and fh.attrs["num_classes"] == y.max() + 1
        assert fh["x"].chunks[1:] == (6,)
    assert describe(str(tmp_path / "o.h5")).num_classes == y.max() + 1


def test_from_numpy_keeps_images_and_makes_integers_float32(tmp_path):
    x = np.arange(4 * 2 * 3 * 3, dtype=np.int16).reshape(4, 2, 3, 3)
    done = write_from_numpy(str(tmp_path / "i.h5"), x, np.array([0, 1, 2, 1]), num_classes=5)
    info = describe(str(tmp_path / "i.h5"))
    assert info.input_shape == (2, 3, 3) and info.num_classes == 5 == done.num_classes
    with h5py.File(tmp_path / "i.h5") as fh:
        assert fh["x"].dtype == np.float32 and fh["x"].shape == (4, 2, 3, 3)


@pytest.mark.parametrize("x,y,kwargs,words", [
    (np.zeros((3, 2)), np.zeros(2, int), {}, "'X' has 3 rows but 'Y' has 2 labels"),
    (np.array([[0.0], [np.nan]]), np.array([0, 1]), {}, "'X': row 1 has NaN or Inf"),
    (np.zeros((2, 1)), np.array([0, -2]), {}, "'Y': label -2 in row 1 is negative"),
    (np.zeros((2, 1)), np.array([0.0, 1.0]), {}, "save y.astype(np.int64)"),
    (np.zeros((2, 1)), np.array([0, 4]), {"num_classes": 3}, "raise --num-classes"),
    (np.zeros((2, 1)), np.array([0, 0]), {}, "at least two classes"),
])
def test_from_numpy_refuses_bad_arrays_naming_the_file(tmp_path, x, y, kwargs, words):
    with pytest.raises(UserError) as err:
        write_from_numpy(str(tmp_path / "o.h5"), x, y, names=("'X'", "'Y'"), **kwargs)
    assert words in str(err.value)
    assert not (tmp_path / "o.h5").exists()  # nothing half-written


def test_from_numpy_refuses_to_overwrite_without_force(tmp_path):
    (tmp_path / "o.h5").write_text("keep")
    with pytest.raises(UserError, match="add --force"):
        write_from_numpy(str(tmp_path / "o.h5"), np.zeros((2, 1)), np.array([0, 1]))
    write_from_numpy(str(tmp_path / "o.h5"), np.zeros((2, 1)), np.array([0, 1]), force=True)
    assert describe(str(tmp_path / "o.h5")).samples == 2
