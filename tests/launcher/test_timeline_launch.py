"""The Chrome trace of whole runs (run.timeline = true): the all-reduces drawn where they ran
(one span per layer's reduction under comm.overlap), the run's environment in the trace, no
part file left behind; a federation's trace per institution, of its own ranks only, in its own
folder, and none gathered at the root."""

from __future__ import annotations

import json

import pytest
from helpers import read_metrics, run_mpi, write_config, write_dataset

ENV_FIELDS = {"mpifed_version", "git_commit", "mpi_library", "world_size", "hosts",
              "config_sha256"}


def spans_of(trace: dict, pid: int, name: str) -> list[dict]:
    return [e for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == pid
            and e["name"] == name]


@pytest.mark.parametrize("overlap", [False, True])
def test_allreduce_spans_are_drawn_where_they_ran(tmp_path, overlap):
    write_dataset(tmp_path / "d.h5", 300, 0, features=6, classes=3, dtype="float32")
    write_config(tmp_path / "run.toml", {
        "data": {"train": "d.h5"}, "model": {"kind": "mlp", "hidden": [8, 8]},
        "optim": {"batch_size": 4, "steps": 10}, "comm": {"overlap": overlap},
        "run": {"out": "out", "timeline": True}})
    done = run_mpi(3, ["train", "run.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trace = json.loads((tmp_path / "out" / "timeline.json").read_text())
    summary = read_metrics(tmp_path / "out", "summary")[0]
    assert trace["otherData"] == {k: summary[k] for k in ENV_FIELDS}
    reductions = 3 if overlap else 1  # one per layer's gradients (3 layers), or one in all
    for rank in range(3):
        reduce = spans_of(trace, rank, "allreduce")
        compute = {e["args"]["step"]: e for e in spans_of(trace, rank, "compute")}
        assert all(e["tid"] == 2 for e in reduce)  # the all-reduce row
        for step in range(1, 11):
            mine = sorted((e for e in reduce if e["args"]["step"] == step),
                          key=lambda e: e["ts"])
            assert len(mine) == reductions
            assert mine[0]["ts"] >= compute[step]["ts"]  # started by this step's backward
            # one communication thread: each reduction ends before the next begins
            assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(mine, mine[1:]))
            if not overlap:  # then it starts when the compute ends
                assert mine[0]["ts"] == pytest.approx(compute[step]["ts"] + compute[step]["dur"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if "timeline" in p.name) == [
        "timeline.json"]


def test_a_federation_writes_one_trace_per_institution(tmp_path):
    sizes = [1, 2, 1]
    for k in range(3):
        write_dataset(tmp_path / f"site-{k}.h5", 120, k, features=6, classes=3,
                      dtype="float32")
    write_config(tmp_path / "fed.toml", {
        "data": {"train": "site-{institution}.h5"}, "model": {"kind": "mlp", "hidden": [8]},
        "optim": {"batch_size": 4},
        "federated": {"institution_sizes": sizes, "rounds": 3, "local_steps": 2},
        "run": {"out": "out", "timeline": True}})
    done = run_mpi(4, ["train", "fed.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out"
    assert not (out / "timeline.json").exists()  # nothing gathered across institutions
    summary = read_metrics(out, "summary")[0]
    for k, size in enumerate(sizes):
        folder = out / f"institution-{k}"
        assert sorted(p.name for p in folder.iterdir()) == ["timeline.json"]
        trace = json.loads((folder / "timeline.json").read_text())
        other = trace["otherData"]
        assert (other["institution"], other["institution_ranks"]) == (k, size)
        assert other["config_sha256"] == summary["config_sha256"]
        spans = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        assert {e["pid"] for e in spans} == set(range(size))  # its own ranks only
        for rank in range(size):
            for name in ("train", "exchange"):
                assert [e["args"]["round"] for e in spans_of(trace, rank, name)] == [1, 2, 3]
            assert sorted(e["args"]["step"] for e in spans_of(trace, rank, "compute")) == \
                list(range(1, 7))  # 2 local steps in each of 3 rounds
            assert len(spans_of(trace, rank, "allreduce")) == 6  # one per step


@pytest.mark.parametrize("shard,overlap", [("optimizer", False), ("optimizer", True),
                                           ("parameters", True)])
def test_sharded_steps_draw_their_collectives_where_they_ran(tmp_path, shard, overlap):
    """ZeRO stages: the reduce-scatters (per layer under overlap) and gathers each get a span
    inside their step; the gradients' exchange runs before the step's update ends, so the
    spans are not all drawn after the compute, as a step that kept none would have them."""
    write_dataset(tmp_path / "d.h5", 300, 0, features=6, classes=3, dtype="float32")
    write_config(tmp_path / "run.toml", {
        "data": {"train": "d.h5"}, "model": {"kind": "mlp", "hidden": [8, 8]},
        "optim": {"batch_size": 4, "steps": 6, "name": "adam", "lr": 0.01},
        "comm": {"overlap": overlap, "shard": shard}, "run": {"out": "out", "timeline": True}})
    done = run_mpi(2, ["train", "run.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trace = json.loads((tmp_path / "out" / "timeline.json").read_text())
    # optimizer: one reduce-scatter (3 under overlap, one per layer), then the gather of the
    # parameters; parameters: 3 forward layer gathers and the first layer's again for its
    # backward (the other two are still in the two buffers), 3 reduce-scatters, the slots'
    # all-reduce
    count = {("optimizer", False): 2, ("optimizer", True): 4, ("parameters", True): 8}
    for rank in range(2):
        compute = {e["args"]["step"]: e for e in spans_of(trace, rank, "compute")}
        for step in range(1, 7):
            mine = sorted((e for e in spans_of(trace, rank, "allreduce")
                           if e["args"]["step"] == step), key=lambda e: e["ts"])
            assert len(mine) == count[(shard, overlap)]
            begin, end = compute[step]["ts"], compute[step]["ts"] + compute[step]["dur"]
            assert all(e["ts"] >= begin - 1e-3 for e in mine)
            assert mine[0]["ts"] + mine[0]["dur"] <= end + 1e-3  # the exchange before the update
            assert mine[-1]["ts"] >= end - 1e-3  # the last gather after it
