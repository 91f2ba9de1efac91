"""The measured "auto": the decision from injected timings, the size buckets, the per-topology
cache file (key, corrupt and foreign files, refresh, MPIFED_AUTOTUNE=0), on one rank.

No test here times anything: every timing comes from a fake timer.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from mpi4py import MPI

from mpifed.comm import choose_algorithm
from mpifed.comm.autotune import (
    CLOSE,
    REPEATS,
    Scratch,
    Table,
    bucket_bytes,
    call_orders,
    close_call,
    decide,
    decode,
    encode,
    measure,
    repeats_for,
)
from mpifed.errors import UserError
from mpifed.train import allreduce_choice as ac


class FakeTimer:
    """Seconds per (algorithm, bytes) from a table; counts its calls, moves no bytes."""

    def __init__(self, seconds: dict):
        self.seconds, self.calls = seconds, []

    def __call__(self, algorithm, buf, comm):
        self.calls.append((algorithm, buf.nbytes))
        return self.seconds[algorithm, buf.nbytes]


def scratch(nbytes):
    return np.zeros(max(1, nbytes // 4), dtype=np.float32)


@pytest.mark.parametrize("nbytes,bucket", [
    (0, 1), (1, 1), (2, 2), (3, 4), (5, 4), (6, 8), (1024, 1024), (1448, 1024), (1449, 2048),
    (3 << 20, 4 << 20), (5 << 20, 4 << 20), (6 << 20, 8 << 20)])
def test_buckets_are_the_nearest_power_of_two_on_a_log_scale(nbytes, bucket):
    assert bucket_bytes(nbytes) == bucket
    # the bucket lies within a factor sqrt(2) of the size
    assert nbytes == 0 or bucket / 2 ** 0.5 <= nbytes < bucket * 2 ** 0.5


def test_decide_picks_the_fastest_and_breaks_ties_by_order():
    seconds = np.array([[3.0, 1.0], [2.0, 2.0], [1.0, 5.0]])
    assert decide([64, 1024, 1 << 20], ("ring", "mpi"), seconds) == {
        64: "mpi", 1024: "ring", 1 << 20: "ring"}


def test_measure_takes_each_algorithms_median_of_injected_timings():
    comm = MPI.COMM_SELF  # one node of one rank: ring and mpi are the candidates
    timer = FakeTimer({("ring", 1024): 5.0, ("mpi", 1024): 1.0,
                       ("ring", 4096): 2.0, ("mpi", 4096): 3.0})
    table, seconds = measure(comm, [1024, 4096], scratch, timer=timer, repeats=3)
    assert table == {1024: "mpi", 4096: "ring"}
    assert seconds[4096] == {"ring": 2.0, "mpi": 3.0}
    assert len(timer.calls) == 2 * 2 * (1 + 3)  # one warm-up and 3 timed calls each


def test_the_median_ignores_one_outlier():
    # ring's warm-up, then 1, 100, 1: its median (1) beats mpi's 1.5, its mean (34) would not
    ring = iter([9.0, 1.0, 100.0, 1.0])

    def timer(algorithm, buf, comm):
        return next(ring) if algorithm == "ring" else 1.5

    table, seconds = measure(MPI.COMM_SELF, [64], scratch, timer=timer, repeats=3)
    assert table == {64: "ring"} and seconds[64] == {"ring": 1.0, "mpi": 1.5}


def test_small_buckets_get_more_calls_between_the_bounds():
    assert repeats_for(16 << 20) == REPEATS and repeats_for(64 << 20) == REPEATS
    assert repeats_for(2 << 20) == REPEATS and repeats_for(1 << 20) == 8
    assert repeats_for(1 << 16) == 11 and repeats_for(1) == 11
    counts = [repeats_for(1 << k) for k in range(10, 26)]
    assert counts == sorted(counts, reverse=True)  # never more calls for a larger bucket


def test_a_close_call_is_the_fastest_two_within_ten_percent():
    assert close_call(np.array([2.0, 1.0, 1.05])) == [1, 2]
    assert close_call(np.array([1.0, 1.0 * CLOSE])) == [0, 1]  # the edge counts as close
    assert close_call(np.array([1.0, 1.2, 3.0])) is None
    assert close_call(np.array([1.0])) is None  # one candidate: nothing to re-check


def test_a_close_call_is_timed_again_and_decided_on_all_its_calls():
    # At 1 MiB (8 calls each) mpi's first calls all say 1.0 and the ring's 1.05: mpi wins the
    # first pass by 5%, a close call. The second pass (16 more calls of those two) finds mpi
    # at 2.0: over all 24 calls its median is 2.0, the ring's 1.05, so the ring is chosen.
    # 4 KiB is not close (1 vs 3) and gets no second pass.
    nbytes, first = 1 << 20, repeats_for(1 << 20)
    mpi_calls = []

    def timer(algorithm, buf, comm):
        if buf.nbytes == 4096:
            return 1.0 if algorithm == "ring" else 3.0
        if algorithm == "ring":
            return 1.05
        mpi_calls.append(1)
        return 1.0 if len(mpi_calls) <= 1 + first else 2.0  # warm-up and first pass: 1.0

    table, seconds = measure(MPI.COMM_SELF, [4096, nbytes], scratch, timer=timer)
    assert table == {4096: "ring", nbytes: "ring"}
    assert seconds[nbytes] == {"ring": 1.05, "mpi": 2.0}
    assert len(mpi_calls) == 1 + first + 2 * first


def test_with_fixed_repeats_a_close_call_is_not_timed_again():
    timer = FakeTimer({("ring", 1024): 1.05, ("mpi", 1024): 1.0})
    table, _ = measure(MPI.COMM_SELF, [1024], scratch, timer=timer, repeats=3)
    assert table == {1024: "mpi"} and len(timer.calls) == 2 * (1 + 3)


def test_repeats_must_be_none_or_a_positive_int():
    timer = FakeTimer({("ring", 1024): 1.0, ("mpi", 1024): 2.0})
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="repeats"):
            measure(MPI.COMM_SELF, [1024], scratch, timer=timer, repeats=bad)
    assert timer.calls == []  # refused before any call


def test_scratch_gives_ordinary_arrays_fresh_and_window_arrays_views():
    ordinary = Scratch(MPI.COMM_SELF, 1 << 20, "float32", window=False)
    a, b = ordinary(4096), ordinary(4096)
    assert a.dtype == np.float32 and a.size == 1024 and not a.any()
    assert not np.shares_memory(a, b) and a.base is None  # an array of its own size each time
    assert ordinary(1).size == 1  # at least one element
    ordinary.free()  # nothing to free
    window = Scratch(MPI.COMM_SELF, 1 << 20, "float64", window=True)
    try:
        c, d = window(8192), window(1 << 20)
        assert c.size == 1024 and d.size == (1 << 20) // 8 and np.shares_memory(c, d)
    finally:
        window.free()


def test_call_orders_are_permutations_alike_for_a_seed_with_varying_neighbours():
    orders = call_orders(3, 60, [1 << 20, 0])
    assert orders == call_orders(3, 60, [1 << 20, 0])  # every rank computes the same orders
    assert orders != call_orders(3, 60, [1 << 20, 1])
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    # unlike a rotation, each algorithm is preceded by each other one at some point
    before = {(o[i - 1], o[i]) for o in orders for i in range(1, 3)}
    assert before == {(a, b) for a in range(3) for b in range(3) if a != b}


def test_encoding_round_trips_as_indices_into_the_algorithm_names():
    table = {65536: "mpi", 1 << 20: "hierarchical", 1 << 24: "ring"}
    assert all(isinstance(v, int) for v in encode(table))
    assert decode(encode(table)) == table
    with pytest.raises(ValueError):
        decode([64, 99])


def test_choose_algorithm_follows_a_table_and_the_rule_elsewhere():
    table = {1 << 20: "hierarchical"}
    assert choose_algorithm(1 << 20, 4, 1, table=table) == "hierarchical"
    assert choose_algorithm(900_000, 4, 1, table=table) == "hierarchical"  # same bucket
    assert choose_algorithm(64, 4, 1, table=table) == choose_algorithm(64, 4, 1)
    assert choose_algorithm(1 << 20, 4, 1, device=True, table=table) == "mpi"  # host only


def test_a_table_resolves_each_size_once_as_choose_algorithm_does():
    measured = {1 << 16: "mpi", 1 << 20: "ring", 1 << 24: "hierarchical"}
    table = Table(measured)
    assert table == measured and table.by_nbytes == {}
    sizes = [1 << 16, 50_000, 90_000, 1 << 20, 800_000, 1 << 24, 3000, 1 << 30]
    for nbytes in sizes:
        rule = choose_algorithm(nbytes, 4, 2, table=measured)
        chosen = table.algorithm(nbytes)
        assert chosen == (rule if bucket_bytes(nbytes) in measured else None), nbytes
    # only the sizes the table decides are kept; a later call is one dict lookup
    assert table.by_nbytes == {n: measured[bucket_bytes(n)] for n in sizes
                               if bucket_bytes(n) in measured}
    table.by_nbytes[1 << 16] = "sentinel"
    assert table.algorithm(1 << 16) == "sentinel"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MPIFED_AUTOTUNE", raising=False)
    return tmp_path / "mpifed"


SECONDS = {("ring", 1024): 2.0, ("mpi", 1024): 1.0, ("ring", 1 << 20): 1.0,
           ("mpi", 1 << 20): 2.0, ("ring", 1 << 16): 1.0, ("mpi", 1 << 16): 3.0}


def test_measures_once_then_reads_the_cache(cache, capsys):
    timer = FakeTimer(SECONDS)
    table, source = ac.tuned_table(MPI.COMM_SELF, [1024, 1 << 20], "float32", False,
                                   timer=timer)
    assert table == {1024: "mpi", 1 << 20: "ring"} and source.startswith("measured 2")
    [path] = cache.glob("allreduce-*.json")
    data = json.loads(path.read_text())
    assert data["choice"] == {"1024": "mpi", "1048576": "ring"}
    assert data["key"]["world_size"] == 1 and data["key"]["dtype"] == "float32"
    assert path.name == f"allreduce-{os.path.basename(ac.cache_path(data['key']))[10:]}"
    again = FakeTimer(SECONDS)
    table, source = ac.tuned_table(MPI.COMM_SELF, [1 << 20, 1024], "float32", False,
                                   timer=again)
    assert table == {1024: "mpi", 1 << 20: "ring"} and again.calls == []
    assert "read from the cache" in source
    # a new size: only it is measured, and the file keeps the old ones
    table, _ = ac.tuned_table(MPI.COMM_SELF, [1024, 1 << 16], "float32", False, timer=again)
    assert {n for _, n in again.calls} == {1 << 16}
    assert set(json.loads(path.read_text())["choice"]) == {"1024", "65536", "1048576"}
    assert capsys.readouterr().err == ""  # nothing to warn about


@pytest.mark.parametrize("text", ["{not json", json.dumps({"format": "something else"}),
                                  json.dumps([1, 2])])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(cache, capsys, text):
    key = ac.topology_key(MPI.COMM_SELF, "float32", False)
    path = ac.cache_path(key)
    os.makedirs(cache, exist_ok=True)
    with open(path, "w") as fh:
        fh.write(text)
    timer = FakeTimer(SECONDS)
    table, _ = ac.tuned_table(MPI.COMM_SELF, [1024], "float32", False, timer=timer)
    assert table == {1024: "mpi"} and timer.calls
    assert "ignoring the cache" in capsys.readouterr().err
    assert json.loads(open(path).read())["choice"] == {"1024": "mpi"}


def test_a_foreign_or_tampered_cache_is_ignored(cache, capsys):
    key = ac.topology_key(MPI.COMM_SELF, "float32", False)
    path = ac.cache_path(key)
    ac.write_cache(path, dict(key, world_size=64), {1024: "ring"}, {})
    timer = FakeTimer(SECONDS)
    assert ac.tuned_table(MPI.COMM_SELF, [1024], "float32", False, timer=timer)[0] == {
        1024: "mpi"}
    assert "another topology" in capsys.readouterr().err
    ac.write_cache(path, key, {1024: "nccl"}, {})  # never on host arrays
    assert ac.tuned_table(MPI.COMM_SELF, [1024], "float32", False, timer=timer)[0] == {
        1024: "mpi"}
    assert "bad entry" in capsys.readouterr().err


def test_refresh_measures_again_and_zero_measures_nothing(cache, monkeypatch):
    ac.tuned_table(MPI.COMM_SELF, [1024], "float32", False, timer=FakeTimer(SECONDS))
    monkeypatch.setenv("MPIFED_AUTOTUNE", "refresh")
    timer = FakeTimer({**SECONDS, ("ring", 1024): 0.5})
    assert ac.tuned_table(MPI.COMM_SELF, [1024], "float32", False, timer=timer)[0] == {
        1024: "ring"}
    assert timer.calls
    monkeypatch.setenv("MPIFED_AUTOTUNE", "0")
    timer = FakeTimer(SECONDS)
    assert ac.tuned_table(MPI.COMM_SELF, [1024], "float32", False, timer=timer)[0] is None
    assert timer.calls == []
    monkeypatch.setenv("MPIFED_AUTOTUNE", "sometimes")
    with pytest.raises(UserError, match="MPIFED_AUTOTUNE='sometimes'"):
        ac.tuned_table(MPI.COMM_SELF, [1024], "float32", False, timer=timer)


def test_the_key_and_its_file_change_with_the_topology(cache):
    key = ac.topology_key(MPI.COMM_SELF, "float32", False)
    assert set(key) == {"world_size", "node_sizes", "transport", "mpi_library", "dtype",
                        "window"}
    assert key["node_sizes"] == [1] and MPI.Get_library_version().strip() == key["mpi_library"]
    paths = {ac.cache_path(k) for k in [
        key, dict(key, world_size=4), dict(key, node_sizes=[2, 2]), dict(key, dtype="float64"),
        dict(key, window=True), dict(key, mpi_library="Open MPI v5"),
        dict(key, transport="netmod ofi")]}
    assert len(paths) == 7
    assert all(os.path.dirname(p) == str(cache) for p in paths)
    assert ac.cache_path(dict(key)) == ac.cache_path(key)  # stable: a hash of canonical JSON


def test_a_shaped_link_has_a_cache_of_its_own(cache, monkeypatch):
    plain = ac.topology_key(MPI.COMM_SELF, "float32", False)
    monkeypatch.setenv("MPIFED_SHAPED_LINK", "tbf rate 1gbit burst 256kb latency 50ms")
    shaped = ac.topology_key(MPI.COMM_SELF, "float32", False)
    assert shaped == dict(plain, shaped_link="tbf rate 1gbit burst 256kb latency 50ms")
    assert ac.cache_path(shaped) != ac.cache_path(plain)


def test_the_cache_folder_falls_back_to_the_home_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert ac.cache_folder() == str(tmp_path / ".cache" / "mpifed")


def test_gradient_ranges_whole_or_per_layer():
    from mpifed.nn.models import ModelSpec

    spec = ModelSpec("mlp", 5, (7,), 3)
    n = 5 * 7 + 7 + 7 * 3 + 3  # (w1, b1) then (w2, b2)
    assert ac.gradient_ranges(spec, n, np.float32, False) == [(0, n + 2)]
    ranges = ac.gradient_ranges(spec, n, np.float32, True)
    assert sorted(ranges) == [(0, 42), (42, n + 2)]


def test_render_names_sizes_in_binary_units():
    assert ac.render({"512": "mpi", "65536": "mpi", "1048576": "ring"}) == \
        "512 B mpi, 64 KiB mpi, 1 MiB ring"
