"""Block-shuffled streaming of shards read from their file (MPIFED_SHARD_MEMORY_BYTES exceeded).

The order is checked against reference.block_shuffled_order, written from the definition without
mpifed's code; a streamed data-parallel run against the serial reference that walks that order.
"""

from __future__ import annotations

import itertools
import threading

import h5py
import numpy as np
import pytest
from reference import block_shuffled_order

from mpifed.data.blocks import BlockPlan, default_block, default_buffer
from mpifed.data.inspect import inspect_lines, layout_warnings
from mpifed.data.partition import write_partition
from mpifed.data.shards import Shard, describe
from mpifed.data.stream import BlockStream, shard_stream
from mpifed.data.synth import write_synthetic
from mpifed.errors import UserError
from mpifed.train.config import resolve

FEATURES, CLASSES, SAMPLES = 6, 3, 103  # a prime: shards of unequal size, none a block multiple


def write_rows(path, samples=SAMPLES, chunks=None):
    """Write x[i] = (i, i, ...) + noise-free class offset and y; return (x, y)."""
    rng = np.random.default_rng(42)
    y = rng.integers(0, CLASSES, size=samples)
    x = rng.standard_normal((samples, FEATURES)) + y[:, None]
    x[:, 0] = np.arange(samples)  # the row number, to check which rows a batch holds
    with h5py.File(path, "w") as fh:
        fh.create_dataset("x", data=x, chunks=chunks)
        fh["y"] = y
        fh.attrs["num_classes"] = CLASSES
    return x, y


def streamed_shard(path, start, stop, monkeypatch):
    monkeypatch.setenv("MPIFED_SHARD_MEMORY_BYTES", "1")
    shard = Shard(describe(str(path)), start, stop, "float64")
    assert shard.x is None  # read from the file
    return shard


@pytest.mark.parametrize("start,stop,block,buffer", [(5, 65, 7, 3), (0, 103, 10, 2),
                                                     (13, 50, 4, 1), (3, 40, 64, 4),
                                                     (17, 18, 5, 2)])
def test_order_is_the_reference_and_a_permutation(start, stop, block, buffer):
    plan = BlockPlan.of(start, stop, block, buffer)
    for seed, epoch, rank in itertools.product((0, 7), (0, 1, 2), (0, 3)):
        order = plan.epoch_order(seed, epoch, rank)
        np.testing.assert_array_equal(order, block_shuffled_order(start, stop, block, buffer,
                                                                  seed, epoch, rank))
        np.testing.assert_array_equal(np.sort(order), np.arange(stop - start))
    assert all((start + edge) % block == 0 for edge in plan.edges[1:-1])  # cut at file multiples
    assert plan.edges[0] == 0 and plan.edges[-1] == stop - start


@pytest.mark.parametrize("start,stop,block,buffer,batch", [(5, 65, 7, 3, 6), (0, 103, 10, 2, 103),
                                                           (13, 50, 4, 1, 37), (2, 98, 9, 4, 8)])
def test_every_row_once_per_epoch_as_read_from_the_file(tmp_path, monkeypatch, start, stop,
                                                        block, buffer, batch):
    x, y = write_rows(tmp_path / "d.h5")
    shard = streamed_shard(tmp_path / "d.h5", start, stop, monkeypatch)
    per_epoch = (stop - start) // batch
    stream = BlockStream(shard, batch, per_epoch, 5, 1, BlockPlan.of(start, stop, block, buffer))
    try:
        for epoch in range(3):
            got = [stream.next_rows() for _ in range(per_epoch)]
            assert {e for e, _, _ in got} == {epoch}
            rows = np.concatenate([xb[:, 0] for _, xb, _ in got]).astype(np.int64)
            np.testing.assert_array_equal(np.concatenate([yb for _, _, yb in got]), y[rows])
            np.testing.assert_array_equal(np.concatenate([xb for _, xb, _ in got]), x[rows])
            order = block_shuffled_order(start, stop, block, buffer, 5, epoch, 1)
            np.testing.assert_array_equal(rows, start + order[:per_epoch * batch])
            if per_epoch * batch == stop - start:
                np.testing.assert_array_equal(np.sort(rows), np.arange(start, stop))
    finally:
        stream.close()
        shard.close()


def test_resumed_stream_gives_the_same_batches(tmp_path, monkeypatch):
    write_rows(tmp_path / "d.h5", chunks=(6, FEATURES))
    shard = streamed_shard(tmp_path / "d.h5", 11, 90, monkeypatch)
    batch, per_epoch = 9, 8  # 72 of 79 rows an epoch; buffers of 2 blocks straddle batches
    whole = shard_stream(shard, batch, per_epoch, 3, 2, True, buffer=2)
    assert isinstance(whole, BlockStream)
    reference = [whole.next_rows(shard) for _ in range(3 * per_epoch)]
    whole.close()
    for done in (1, 5, 7, 8, 13, 16, 21):
        resumed = shard_stream(shard, batch, per_epoch, 3, 2, True, epoch=done // per_epoch,
                               step=done % per_epoch, buffer=2)
        for want in reference[done:done + 4]:
            got = resumed.next_rows(shard)
            assert got[0] == want[0]
            for g, w in zip(got[1:], want[1:]):
                assert g.dtype == w.dtype and np.array_equal(g, w)
        resumed.close()
    shard.close()


def test_in_memory_and_unshuffled_shards_keep_their_order(tmp_path, monkeypatch):
    write_rows(tmp_path / "d.h5")
    held = Shard(describe(str(tmp_path / "d.h5")), 0, 50, "float64")
    stream = shard_stream(held, 10, 5, 1, 0, True, block=7, buffer=2)
    assert not isinstance(stream, BlockStream)  # a full permutation, as before
    np.testing.assert_array_equal(stream.next()[1],
                                  np.random.default_rng([1, 0, 0]).permutation(50)[:10])
    streamed = streamed_shard(tmp_path / "d.h5", 0, 50, monkeypatch)
    ordered = shard_stream(streamed, 10, 5, 1, 0, False)
    assert not isinstance(ordered, BlockStream)
    np.testing.assert_array_equal(ordered.next_rows(streamed)[1][:, 0], np.arange(10))
    streamed.close()


class FailingShard:
    """A file-backed shard whose reads fail, as a vanished file would."""

    start, stop, dtype = 0, 40, np.dtype("float64")
    y = np.zeros(40, dtype=np.int64)
    info = type("Info", (), {"features": 2})()

    def read_block(self, lo, hi, out):
        raise OSError("read failed")


def test_a_failed_read_reaches_the_consumer_and_close_ends_the_reader(tmp_path, monkeypatch):
    stream = BlockStream(FailingShard(), 4, 10, 0, 0, BlockPlan.of(0, 40, 8, 2))
    with pytest.raises(OSError, match="read failed"):
        stream.next_rows()
    stream.close()
    write_rows(tmp_path / "d.h5")
    shard = streamed_shard(tmp_path / "d.h5", 0, 100, monkeypatch)
    blocked = BlockStream(shard, 4, 25, 0, 0, BlockPlan.of(0, 100, 5, 1))
    blocked.next_rows()
    before = threading.active_count()
    blocked.close()  # the reader waits on a full queue: close must still end it
    assert threading.active_count() == before - 1
    shard.close()


def test_defaults_follow_chunks_and_stay_under_the_memory_share():
    assert default_block((334, 784)) == 334 and default_block(None) == 4096
    row = 784 * 4
    assert default_buffer(334, row, 8 << 30) == (256 << 20) // (334 * row)  # capped at 256 MiB
    assert default_buffer(334, row, 64 << 20) == (8 << 20) // (334 * row)  # 1/8 of the limit
    assert default_buffer(334, row, 1) == 4  # at least 4 blocks, however small the limit


def test_config_keys_default_to_zero_and_refuse_negatives():
    cfg = resolve({"data": {"train": "d.h5"}})
    assert cfg.data.shuffle_block == 0 and cfg.data.shuffle_buffer == 0
    for key in ("shuffle_block", "shuffle_buffer"):
        with pytest.raises(UserError, match=f"data.{key}"):
            resolve({"data": {"train": "d.h5", key: -1}})


def test_writers_chunk_whole_rows_of_about_one_mib(tmp_path):
    write_synthetic(str(tmp_path / "s.h5"), samples=2000, features=784, classes=3)
    write_partition(str(tmp_path / "s.h5"), str(tmp_path / "sites"), [np.arange(0, 1000),
                                                                       np.arange(1000, 1500)])
    for path in (tmp_path / "s.h5", tmp_path / "sites" / "site-0.h5"):
        with h5py.File(path) as fh:
            rows, features = fh["x"].chunks
            assert features == 784 and rows == (1 << 20) // (784 * 4)  # 334 rows, 1022.9 KiB
    with h5py.File(tmp_path / "sites" / "site-1.h5") as fh:
        assert fh["x"].chunks == (334, 784)
    text = "\n".join(inspect_lines(str(tmp_path / "s.h5")))
    assert "chunks of 334 rows x 784 features" in text and "warning" not in text


def test_inspect_warns_about_slow_layouts(tmp_path):
    with h5py.File(tmp_path / "bad.h5", "w") as fh:
        fh.create_dataset("x", data=np.ones((2000, 100), np.float32), chunks=(50, 10))
        fh["y"] = np.zeros(2000, dtype=np.int64)
    text = "\n".join(inspect_lines(str(tmp_path / "bad.h5")))
    assert "split the 100 features into 10 pieces" in text
    assert "chunks of 2.0 KiB make many small reads" in text
    with h5py.File(tmp_path / "gz.h5", "w") as fh:
        fh.create_dataset("x", data=np.ones((2000, 100), np.float32), chunks=(1000, 100),
                          compression="gzip")
        warnings = layout_warnings(fh["x"], 120.0, ["compression"])
        assert len(warnings) == 1 and "decoding runs at 120 MB/s" in warnings[0]
        assert layout_warnings(fh["x"], 2000.0, ["compression"]) == []


@pytest.mark.parametrize("layout", ["contiguous", "chunks", "gzip", "float32", "split",
                                    "unwritten"])
def test_block_reads_equal_hdf5_reads_for_every_layout(tmp_path, monkeypatch, layout):
    x = np.random.default_rng(0).standard_normal((97, FEATURES))
    kwargs = {"contiguous": {}, "chunks": {"chunks": (10, FEATURES)},
              "gzip": {"chunks": (10, FEATURES), "compression": "gzip"},
              "float32": {"chunks": (10, FEATURES), "dtype": np.float32},
              "split": {"chunks": (10, 2)},
              "unwritten": {"chunks": (10, FEATURES), "dtype": "f8"}}[layout]
    with h5py.File(tmp_path / "d.h5", "w") as fh:
        if layout == "unwritten":  # rows 40..59 never written: HDF5 gives the fill value 0
            dx = fh.create_dataset("x", (97, FEATURES), **kwargs)
            dx[:40], dx[60:] = x[:40], x[60:]
            x[40:60] = 0
        else:
            fh.create_dataset("x", data=x, **kwargs)
        fh["y"] = np.zeros(97, dtype=np.int64)
    shard = streamed_shard(tmp_path / "d.h5", 7, 93, monkeypatch)
    direct = layout in ("contiguous", "chunks", "unwritten")
    assert (shard._direct is not None) == direct  # by file offset only where the layout allows
    want = x.astype(np.float32 if layout == "float32" else np.float64).astype(np.float64)
    for lo, hi in ((0, 3), (3, 13), (0, 86), (25, 62), (85, 86)):
        out = np.full((hi - lo, FEATURES), np.nan)
        shard.read_block(lo, hi, out)
        np.testing.assert_array_equal(out, want[7 + lo:7 + hi])
    shard.close()
