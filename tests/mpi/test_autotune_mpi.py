"""The measured "auto" under mpiexec: every rank decides alike from the slowest rank's timings,
and all-reduces that follow the chosen table equal MPI.Allreduce.

Timings are injected (a fake timer) wherever the outcome is asserted; the one real measurement
asserts only that every rank holds the same table.
"""

from __future__ import annotations

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm import allreduce, collectives
from mpifed.comm.autotune import (
    bucket_bytes,
    candidates,
    encode,
    install,
    installed,
    measure,
)
from mpifed.comm.collectives import algorithm_for
from mpifed.nn.models import ModelSpec, init_params
from mpifed.train import allreduce_choice as ac
from mpifed.train.step import DataParallelStep


def same_on_every_rank(comm, table: dict) -> bool:
    ints = encode(table)
    every = comm.allgather(ints)  # test-side only: plain lists of ints
    return all(other == ints for other in every)


@pytest.mark.mpi(min_size=2)
def test_every_rank_decides_alike_from_the_slowest_ranks_median():
    comm = MPI.COMM_WORLD.Dup()
    last = comm.rank == comm.size - 1

    def timer(algorithm, buf, comm_):
        # Every rank but the last finds the ring fastest at both sizes; the last finds it
        # slowest at 1 MiB. Max over ranks: the ring still wins at 64 KiB, loses at 1 MiB.
        if algorithm == "ring":
            return 9.0 if last and buf.nbytes == 1 << 20 else 1.0
        return 2.0 + (comm.rank if algorithm == "hierarchical" else 0)

    buf = np.zeros((1 << 20) // 4, dtype=np.float32)
    table, seconds = measure(comm, [1 << 16, 1 << 20], lambda n: buf[:n // 4], timer=timer,
                             repeats=3)
    assert table == {1 << 16: "ring", 1 << 20: "mpi"}
    assert seconds[1 << 20]["ring"] == 9.0  # the slowest rank's
    assert same_on_every_rank(comm, table)
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("emulated_nodes", [1, 2], indirect=True)
def test_allreduce_following_a_table_equals_mpi_allreduce(emulated_nodes):
    comm = emulated_nodes
    algorithms = candidates(comm)
    sizes = [3, 1000, 4096, 70_000, 300_001]  # elements of float64
    table = {}
    for i, count in enumerate(sizes):  # each candidate somewhere
        table[bucket_bytes(count * 8)] = algorithms[i % len(algorithms)]
    install(comm, table)
    try:
        rng = np.random.default_rng(comm.rank)
        for count in sizes:
            buf = rng.standard_normal(count)
            expected = np.empty_like(buf)
            comm.Allreduce(buf, expected, op=MPI.SUM)
            assert algorithm_for(buf, comm) == table[bucket_bytes(buf.nbytes)]
            allreduce(buf, comm, "sum", "auto")
            np.testing.assert_allclose(buf, expected, rtol=1e-12, atol=1e-12)
        # each size was resolved once, at its first call; later calls look it up only
        assert installed(comm).by_nbytes == {8 * n: table[bucket_bytes(8 * n)] for n in sizes}
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(collectives, "_auto", None)  # a full choice now would fail
            for count in sizes:
                buf = np.full(count, float(comm.rank))
                allreduce(buf, comm, "sum", "auto", check=False)
                assert (buf == comm.size * (comm.size - 1) / 2).all()
    finally:
        install(comm, None)
    assert installed(comm) is None


@pytest.mark.mpi(min_size=2)
def test_a_real_measurement_gives_one_table_and_one_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MPIFED_AUTOTUNE", raising=False)
    comm = MPI.COMM_WORLD.Dup()
    table, source = ac.tuned_table(comm, [256, 4096], "float32", False)
    assert set(table) == {256, 4096} and set(table.values()) <= set(candidates(comm))
    assert same_on_every_rank(comm, table)
    files = list((tmp_path / "mpifed").glob("allreduce-*.json"))
    assert len(files) == (1 if comm.rank == 0 else 0)  # only rank 0 writes
    again, source = ac.tuned_table(comm, [4096], "float32", False)
    assert again == {4096: table[4096]} and "read from the cache" in source
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.parametrize("overlap", [False, True])
def test_an_auto_step_installs_one_table_on_every_rank(tmp_path, monkeypatch, overlap):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MPIFED_AUTOTUNE", raising=False)
    comm = MPI.COMM_WORLD.Dup()
    spec = ModelSpec("mlp", 6, (5,), 3)
    params = init_params(spec, 1, dtype="float64")
    step = DataParallelStep(spec, params, comm, "auto", np, overlap, stall_timeout=0)
    try:
        choice = step.allreduce_choice
        assert len(choice) == (2 if overlap else 1)
        assert comm.allgather(sorted(choice.items())) == [sorted(choice.items())] * comm.size
        assert {int(b): a for b, a in choice.items()} == installed(comm)
    finally:
        step.close()
    step.free()
    comm.Free()
