"""Shared-memory windows: every rank of a node reads the others' segments; lookups and release."""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm.shared import release, shared_array, window_of

pytestmark = pytest.mark.mpi(min_size=1)  # each test: the ranks it needs


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


def test_lifetime_holds_windows_until_released_or_freed_at_exit(node):
    from mpifed.comm import lifetime

    before = lifetime.held()
    kept = shared_array(100, "float64", node)
    forgotten = shared_array(100, "float64", node)
    assert lifetime.held() == before + 2
    release(kept)
    assert lifetime.held() == before + 1 and window_of(kept)[0] is None
    window = window_of(forgotten)[0]
    assert lifetime.release_all() >= 1  # what atexit and MPI_Finalize's first step do
    assert lifetime.held() == 0 and window.win == MPI.WIN_NULL
    assert window_of(forgotten)[0] is None
    window.free()  # a second free does nothing


def test_cached_attributes_are_freed_with_their_communicator():
    from mpifed.comm import lifetime
    from mpifed.comm.topology import topology

    comm = MPI.COMM_WORLD.Dup()
    node, cross = topology(comm)
    held = lifetime.held()
    comm.Free()  # the keyval's delete callback frees node and cross and forgets them
    assert node == MPI.COMM_NULL and cross == MPI.COMM_NULL
    assert lifetime.held() == held - 1


@pytest.mark.mpi(min_size=2)
def test_auto_tells_window_arrays_from_ordinary_ones():
    from mpifed.comm.collectives import _auto, choose_algorithm
    from mpifed.comm.topology import topology

    comm = MPI.COMM_WORLD
    node, _ = topology(comm)
    if node.size < 2:
        pytest.skip("needs several ranks on a node")
    nodes = comm.size // node.size
    count = 1 << 18  # 1 MiB of float32: above every crossover but the ring's on 4+ ranks
    win = shared_array(count, "float32", node)
    plain = np.zeros(count, np.float32)
    try:
        windowed = choose_algorithm(win.nbytes, comm.size, node.size, nodes=nodes)
        expected = choose_algorithm(win.nbytes, comm.size, node.size, window=False, nodes=nodes)
        mixed = win if comm.rank == 0 else plain
        assert windowed == "hierarchical" and (expected != "hierarchical" or nodes > 1)
        if windowed == expected:  # windows make no difference: not asked, the algorithm checks
            for buf in (win, plain, mixed):
                assert _auto(buf, comm, True) == (expected, True)
            return
        assert _auto(win, comm, True) == ("hierarchical", False)  # agreed, checked once
        assert _auto(plain, comm, True) == (expected, False)
        # some ranks in a window, others not: the ordinary choice
        assert _auto(mixed, comm, True) == (expected, False)
    finally:
        release(win)
