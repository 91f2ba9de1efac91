"""Shared-memory windows: every rank of a node reads the others' segments; lookups and release."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm.shared import release, shared_array, window_of

pytestmark = pytest.mark.mpi


@pytest.fixture(params=["self", "node"])
def node(request):
    """A communicator of ranks on one node: COMM_SELF, or this node's ranks of COMM_WORLD."""
    if request.param == "self":
        yield MPI.COMM_SELF
        return
    comm = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    yield comm
    comm.Free()


@pytest.mark.parametrize("dtype", ["float32", "int64"])
def test_each_rank_sees_every_segment(node, dtype):
    own = shared_array(1001, dtype, node)
    assert own.shape == (1001,) and own.dtype == np.dtype(dtype)
    own[...] = np.arange(1001) + 10_000 * node.rank
    window, offset = window_of(own)
    assert offset == 0
    window.fence()  # every rank's stores are visible after it
    for rank, segment in enumerate(window.views(dtype, 1001)):
        np.testing.assert_array_equal(segment, np.arange(1001) + 10_000 * rank)
    window.fence()  # no rank frees while another still reads
    release(own)


def test_window_of_finds_slices_and_only_shared_arrays(node):
    a = shared_array(64, "float64", node)
    b = shared_array(32, "float32", node)
    window_a, window_b = window_of(a)[0], window_of(b)[0]
    assert window_a is not None and window_b is not None and window_a is not window_b
    assert window_of(a[5:20]) == (window_a, 5 * 8)
    assert window_of(b[31:]) == (window_b, 31 * 4)
    assert window_of(a.copy()) == (None, 0)
    assert window_of(np.zeros(4)) == (None, 0)
    assert window_of([1.0, 2.0]) == (None, 0)
    release(a)
    assert window_of(a) == (None, 0)  # released: no longer a window's
    assert window_of(b)[0] is window_b  # the other window is untouched
    release(b)
    assert window_of(b) == (None, 0)


def test_release_of_an_ordinary_array_does_nothing(node):
    plain = np.ones(8)
    release(plain)  # no window: not collective, no error
    np.testing.assert_array_equal(plain, np.ones(8))


def test_an_empty_shared_array(node):
    empty = shared_array(0, "float64", node)
    assert empty.size == 0
    release(empty)
