"""The fusion helper round-trips shapes and dtypes (no MPI)."""

import numpy as np
import pytest

from mpifed.comm import fuse, unfuse, views


def test_round_trip_shapes_and_dtypes(xp):
    arrays = [xp.arange(12, dtype=xp.float32).reshape(3, 4), xp.ones(5, dtype=xp.float32),
              xp.full((2, 1, 2), 7, dtype=xp.int32), xp.asarray(3.5, dtype=xp.float64)]
    flat, layout = fuse(arrays)
    assert flat.ndim == 1 and flat.size == 12 + 5 + 4 + 1
    assert flat.dtype == xp.float64  # common type of the inputs
    back = unfuse(flat, layout)
    for original, restored in zip(arrays, back):
        assert restored.shape == original.shape and restored.dtype == original.dtype
        np.testing.assert_array_equal(np.asarray(restored.tolist()), np.asarray(original.tolist()))


def test_views_share_memory_with_flat():
    arrays = [np.zeros((2, 3)), np.zeros(4)]
    flat, layout = fuse(arrays)
    weights, bias = views(flat, layout)
    flat[:] = np.arange(10)
    np.testing.assert_array_equal(weights, [[0, 1, 2], [3, 4, 5]])
    np.testing.assert_array_equal(bias, [6, 7, 8, 9])


def test_out_buffer_is_reused_and_checked():
    arrays = [np.ones(3), np.ones(2)]
    out = np.empty(5)
    flat, _ = fuse(arrays, out=out)
    assert flat is out
    with pytest.raises(ValueError, match="out has 4 elements"):
        fuse(arrays, out=np.empty(4))
