"""The all-reduce sweep's rounds (mpifed/benchmarks/allreduce.py, --rounds): each algorithm's
time is its median over the rounds, auto/best is taken from those medians."""

from __future__ import annotations

import pytest

from mpifed.benchmarks.allreduce import ALGOS, auto_vs_best, merge_rounds


def row(size: int, times: dict, wrong: int = 0) -> dict:
    return {"size": size, "count": size // 4, "type": "float32", "auto_picks": "mpi",
            **{a: {"time_us": times[a], "algbw": 0.0, "busbw": 0.0, "wrong": wrong,
                   "best_us": times[a] / 2} for a in ALGOS}}


def test_each_algorithm_takes_its_median_over_the_rounds():
    rounds = [row(1 << 20, {"ring": 10.0, "mpi": 20.0, "hierarchical": 30.0, "auto": 10.5}),
              row(1 << 20, {"ring": 90.0, "mpi": 21.0, "hierarchical": 31.0, "auto": 99.0}, 1),
              row(1 << 20, {"ring": 11.0, "mpi": 19.0, "hierarchical": 29.0, "auto": 11.5})]
    merged = merge_rounds(rounds, ranks=4)
    assert {a: merged[a]["time_us"] for a in ALGOS} == {"ring": 11.0, "mpi": 20.0,
                                                        "hierarchical": 30.0, "auto": 11.5}
    assert merged["ring"]["rounds_us"] == [10.0, 90.0, 11.0]
    assert merged["ring"]["best_us"] == 5.0  # the fastest call of any round
    assert merged["mpi"]["wrong"] == 1  # every round's wrong elements count
    # algbw from the median time: 1 MiB in 11 us; busbw = algbw * 2(p-1)/p
    assert merged["ring"]["algbw"] == pytest.approx((1 << 20) / 11e-6 / 1e9)
    assert merged["ring"]["busbw"] == pytest.approx(merged["ring"]["algbw"] * 1.5)
    # the busy second round (ring and auto 9x slower) spoils nothing
    assert auto_vs_best(merged) == pytest.approx(11.5 / 11.0)
    assert auto_vs_best(merged, "best_us") == pytest.approx(5.25 / 5.0)


def test_auto_as_fast_as_the_best_is_one():
    assert auto_vs_best(row(64, {"ring": 3.0, "mpi": 2.0, "hierarchical": 4.0,
                                 "auto": 2.0})) == 1.0
