"""The timeline's pieces on one process (mpifed/train/timeline.py): the clock offset from
ping-pong samples, the placement of a rank's spans on rank 0's clock, events streamed to a part
file as they happen, and the parts joined into one Chrome trace."""

from __future__ import annotations

import json

import pytest

from mpifed.train.timeline import (
    COMM,
    Timeline,
    clock_offsets,
    join_parts,
    offset_estimate,
    part_path,
)


def test_the_offset_comes_from_the_shortest_round_trip():
    # remote clock = local + 100 s; the remote reads its clock somewhere inside each trip
    samples = [(0.0, 100.0 + 0.9, 1.0),   # trip 1 s, read late: estimate 100.4
               (5.0, 100.0 + 5.05, 5.1),  # trip 0.1 s: estimate 100.0
               (9.0, 100.0 + 9.0, 9.5)]   # trip 0.5 s
    offset, trip = offset_estimate(samples)
    assert offset == pytest.approx(100.0) and trip == pytest.approx(0.1)
    # the error is at most half the trip, wherever in it the remote read its clock
    for when in (0.0, 0.3, 1.0):
        got, trip = offset_estimate([(2.0, 102.0 + when, 3.0)])
        assert abs(got - 100.0) <= trip / 2 + 1e-12


def test_spans_are_placed_on_the_trace_clock_and_streamed(tmp_path):
    path = str(tmp_path / "timeline.json")
    timeline = Timeline(True, 1, part_path(path, 1), base=2.5)
    timeline.origin = 10.0  # perf_counter 10.0 on this rank is 2.5 s after the trace's zero
    timeline.span("compute", 11.0, 11.25, 7)
    timeline.span("allreduce", 11.25, 11.5, 7, COMM)
    timeline._fh.flush()
    lines = [json.loads(line) for line in open(part_path(path, 1))]  # on disk already
    assert [(e["name"], e["ts"], e["dur"], e["tid"]) for e in lines] == [
        ("compute", 3.5e6, 0.25e6, 0), ("allreduce", 3.75e6, 0.25e6, COMM)]
    timeline.span("empty", 12.0, 12.0, 8)  # zero length: not recorded
    timeline.close()
    assert len(open(part_path(path, 1)).readlines()) == 2


def test_read_totals_are_kept_without_a_part_file():
    timeline = Timeline(True, 0)  # benchmarks: no file, the totals only
    timeline.read(1.0, 1.5, rows=10, nbytes=4000)
    timeline.read(2.0, 2.25, rows=5, nbytes=2000)
    assert (timeline.read_count, timeline.read_bytes, timeline.read_seconds) == (2, 6000, 0.75)


def test_parts_join_into_one_trace_and_are_removed(tmp_path):
    path = str(tmp_path / "timeline.json")
    for rank in range(3):
        timeline = Timeline(True, rank, part_path(path, rank))
        timeline.origin = 0.0
        timeline.span("compute", rank, rank + 0.5, 1)
        timeline.close()
    join_parts(path, 3, {"world_size": 3, "hosts": ["a"]})
    trace = json.load(open(path))
    assert trace["otherData"] == {"world_size": 3, "hosts": ["a"]}
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert [(e["pid"], e["ts"]) for e in spans] == [(0, 0.0), (1, 1e6), (2, 2e6)]
    names = {(e["pid"], e["args"]["name"]) for e in trace["traceEvents"]
             if e["name"] == "process_name"}
    assert names == {(0, "rank 0"), (1, "rank 1"), (2, "rank 2")}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["timeline.json"]


def test_a_missing_part_is_left_out_with_a_warning(tmp_path, caplog):
    path = str(tmp_path / "timeline.json")
    timeline = Timeline(True, 0, part_path(path, 0))
    timeline.span("compute", timeline.origin, timeline.origin + 1, 1)
    timeline.close()
    join_parts(path, 2, {})  # rank 1 wrote on a folder this host does not see
    trace = json.load(open(path))
    assert {e["pid"] for e in trace["traceEvents"] if e["ph"] == "X"} == {0}
    assert "rank 1's events are not in" in caplog.text


class GlobalClockComm:
    """A communicator whose MPI_WTIME_IS_GLOBAL is true and which refuses any message."""

    rank, size = 1, 4

    def Get_attr(self, keyval):
        return True

    def __getattr__(self, name):
        raise AssertionError(f"{name} called: a global clock needs no measuring")


def test_a_global_wtime_needs_no_measuring():
    assert clock_offsets(GlobalClockComm()) == (0.0, 0.0)
