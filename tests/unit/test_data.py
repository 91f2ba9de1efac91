"""Sharding rule, batch streams, dataset writers and inspection (no MPI)."""

import h5py
import numpy as np
from helpers import write_h5

from mpifed.data.inspect import inspect_lines
from mpifed.data.shards import Shard, describe, shard_bounds
from mpifed.data.stream import BatchStream
from mpifed.data.synth import write_digits, write_synthetic


def test_shard_bounds_follow_the_rule():
    assert [shard_bounds(10, 3, r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [shard_bounds(2, 4, r) for r in range(4)] == [(0, 0), (0, 1), (1, 1), (1, 2)]


def test_stream_continues_across_epochs_and_reshuffles():
    stream = BatchStream(10, 3, 3, seed=1, rank=0, shuffle=True)
    first = [stream.next() for _ in range(3)]
    second = [stream.next() for _ in range(3)]
    assert [e for e, _ in first] == [0, 0, 0] and [e for e, _ in second] == [1, 1, 1]
    flat0 = np.concatenate([i for _, i in first])
    assert len(set(flat0)) == 9  # a permutation's first 9 rows: no repeats
    assert not np.array_equal(flat0, np.concatenate([i for _, i in second]))
    ordered = BatchStream(5, 2, 2, seed=0, rank=0, shuffle=False)
    assert [list(ordered.next()[1]) for _ in range(3)] == [[0, 1], [2, 3], [0, 1]]


def test_synthetic_is_streamed_and_learnable(tmp_path):
    path = str(tmp_path / "s.h5")
    write_synthetic(path, samples=70_000, features=5, classes=3, seed=2)
    with h5py.File(path) as fh:
        x, y = fh["x"][...], fh["y"][...]
        assert x.shape == (70_000, 5) and fh.attrs["num_classes"] == 3
    centroids = np.stack([x[y == c].mean(axis=0) for c in range(3)])
    nearest = np.argmin(((x[:, None, :] - centroids) ** 2).sum(-1), axis=1)
    assert (nearest == y).mean() > 0.8  # nearest-centroid separates the classes


def test_digits_and_inspect(tmp_path):
    train, test = write_digits(str(tmp_path))
    info = describe(train)
    assert info.features == 64 and info.num_classes == 10
    assert info.samples + describe(test).samples == 1797
    text = "\n".join(inspect_lines(train))
    assert "class counts of y" in text and "shape (" in text


def test_shard_reads_only_its_rows(tmp_path, monkeypatch):
    path = str(tmp_path / "s.h5")
    write_h5(path, x=np.arange(20, dtype=np.float32).reshape(10, 2), y=np.arange(10))
    info = describe(path)
    shard = Shard(info, 3, 6)
    np.testing.assert_array_equal(shard.y, [3, 4, 5])
    np.testing.assert_array_equal(shard.rows(np.array([2, 0]))[0], [[10, 11], [6, 7]])
    monkeypatch.setenv("MPIFED_SHARD_MEMORY_BYTES", "1")  # the from-file path
    big = Shard(info, 3, 6)
    assert big.x is None
    x, y = big.rows(np.array([2, 0, 1]))
    np.testing.assert_array_equal(x, [[10, 11], [6, 7], [8, 9]])
    np.testing.assert_array_equal(y, [5, 3, 4])
    big.close()
