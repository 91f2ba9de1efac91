"""The benchmark harness: what it calls, in which order, and the record it writes. No test here
assumes anything about how long a step takes (the machine is shared and noisy)."""

from __future__ import annotations

import json

import pytest

from mpifed.benchmarks import harness
from mpifed.benchmarks.harness import FIELDS, Record, Steps, Timing, time_steps


class Calls:
    """A fake step and sync that log every call in order."""

    def __init__(self):
        self.log = []

    def step(self, i):
        self.log.append(("step", i))

    def sync(self):
        self.log.append(("sync",))


@pytest.mark.parametrize("warmup, steps, repeats", [(0, 1, 1), (3, 4, 1), (2, 5, 3)])
def test_warmup_then_steps_per_repeat_between_syncs(warmup, steps, repeats):
    calls = Calls()
    timing = time_steps(calls.step, steps, warmup, repeats, sync=calls.sync,
                        samples_per_step=7)
    expected = [("step", i) for i in range(warmup)]
    for r in range(repeats):
        first = warmup + r * steps
        expected += [("sync",), *[("step", first + k) for k in range(steps)], ("sync",)]
    assert calls.log == expected
    assert (timing.warmup, timing.steps, timing.samples_per_step) == (warmup, steps, 7)
    assert len(timing.seconds) == len(timing.cpu_seconds) == repeats
    assert timing.best == min(timing.seconds) and timing.best <= timing.median
    assert timing.samples_per_second == 7 / timing.best


def test_probe_gives_its_increase_per_step_of_the_timed_steps_only():
    total = [0.0]

    def step(i):
        total[0] += 1.0 if i < 2 else 0.5  # warm-up steps add more: they must not count

    timing = time_steps(step, 4, 2, repeats=2, probe=lambda: total[0])
    assert timing.probe == [0.5, 0.5]


@pytest.mark.parametrize("steps, warmup, repeats", [(0, 1, 1), (1, -1, 1), (1, 1, 0)])
def test_counts_that_time_nothing_are_refused_by_name(steps, warmup, repeats):
    with pytest.raises(ValueError, match="--steps >= 1, --repeats >= 1 and --warmup >= 0"):
        time_steps(lambda i: None, steps, warmup, repeats)


def test_measure_reports_the_timing_and_the_communication_share():
    comm_total = [0.0]

    def step(i):
        comm_total[0] += 0.0  # no communication at all

    got = harness.measure(Steps(step, lambda: None, lambda: comm_total[0]), 3, 2, 8)
    assert got["comm_fraction"] == 0.0
    assert Timing.from_dict(got["timing"]).steps == 3
    assert got["samples_per_s"] == Timing.from_dict(got["timing"]).samples_per_second
    assert harness.measure(Steps(step, lambda: None), 1, 0, 8)["comm_fraction"] is None


def test_record_has_every_field_and_round_trips_through_json_lines(tmp_path):
    timings = [Timing(2, 5, 128, [0.02], [0.01]), Timing(2, 5, 128, [0.01, 0.04], [0.01, 0.02])]
    record = Record.build("throughput", "torch-ddp", "torch", 2, {"batch_per_rank": 64},
                          timings, {"comm_fraction": None})
    data = record.to_dict()
    assert set(data) == set(FIELDS)
    assert {"benchmark", "system", "ranks", "config", "warmup", "steps", "repeats", "seconds",
            "median", "samples_per_second", "machine", "command", "timestamp"} <= set(data)
    assert data["seconds"] == [0.02, 0.01, 0.04] and data["repeats"] == 3
    assert data["median"] == 0.02 and data["best"] == 0.01
    assert data["samples_per_second"] == pytest.approx(128 / 0.01)
    for key in ("hostname", "cpu_count", "python", "numpy", "mpi_library"):
        assert key in data["machine"]
    path = tmp_path / "runs.jsonl"
    harness.append_records(str(path), [record])
    harness.append_records(str(path), [record])  # appends: one line each
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[0]) == json.loads(json.dumps(data))
    assert harness.read_records(str(path)) == [record, record]


def test_records_refuse_pooling_different_warmups_and_missing_fields():
    with pytest.raises(ValueError, match="same warm-up"):
        Record.build("b", "mpifed", "ours", 1, {},
                     [Timing(1, 5, 1, [1.0], [1.0]), Timing(2, 5, 1, [1.0], [1.0])], machine={})
    with pytest.raises(ValueError, match="missing"):
        Record.from_dict({"benchmark": "b"})


def test_a_unit_without_samples_has_no_rate():
    record = Record.build("federated-round", "mpifed", "4 x 1", 4, {},
                          [Timing(1, 1, 0, [0.3, 0.2], [])], machine={}, unit="round")
    assert record.samples_per_second is None and record.unit == "round"


def test_warmup_rounds_cover_the_warmup_steps():
    assert [harness.warmup_rounds(w, 10) for w in (0, 1, 10, 11)] == [0, 1, 1, 2]


def test_table_rows_line_up_under_the_header(capsys):
    columns = [harness.Column("name", 6, lambda r: r["name"], "<"),
               harness.Column("n/s", 8, lambda r: f"{r['n']:,.0f}")]
    harness.print_table(columns, [{"name": "ours", "n": 12345.6}], "title")
    assert capsys.readouterr().out.splitlines() == [
        "# title", "# name        n/s", "  ours     12,346"]


# --- the throughput benchmark: ours and the peer get the same warm-up ------------------------


def test_throughput_launches_every_impl_with_the_same_warmup():
    from mpifed.benchmarks import train_throughput as tt

    commands = {impl: tt.worker_command(impl, 2, "d.h5", 7, 3, "out") for impl in tt.SIDES}
    for impl, cmd in commands.items():
        assert cmd[cmd.index("--warmup") + 1] == "3" and cmd[cmd.index("--steps") + 1] == "7"
        assert [a for a in cmd if a != impl] == [a for a in commands["ours"] if a != "ours"]


def test_throughput_with_torch_on_one_rank(tmp_path, capsys):
    """The whole CPU benchmark, tiny: 1 rank, 2 warm-up and 2 timed steps, ours and torch."""
    pytest.importorskip("torch")
    from mpifed.benchmarks import train_throughput as tt

    path = tmp_path / "runs.jsonl"
    assert tt.main(["--ranks", "1", "--steps", "2", "--warmup", "2", "--repeats", "1",
                    "--samples", "512", "--records", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ours/torch" in out and "torch" in out.splitlines()[-1]
    records = harness.read_records(str(path))
    assert {r.impl for r in records} == {"ours", "ours-overlap", "torch"}
    assert {(r.warmup, r.steps) for r in records} == {(2, 2)}
    assert {r.system for r in records} == {"mpifed", "torch-ddp"}


def test_a_record_names_its_environment():
    import hashlib

    from mpifed import __version__
    from mpifed.train.environment import git_commit

    config = {"batch_per_rank": 64, "hidden": [256]}
    machine = {"hostname": "n1", "mpi_library": "Open MPI v4.1.4"}
    record = Record.build("throughput", "mpifed", "ours", 4, config,
                          [Timing(2, 5, 128, [0.02], [0.01])], machine=machine)
    canonical = json.dumps({"batch_per_rank": 64, "hidden": [256]}, sort_keys=True)
    assert record.environment == {
        "mpifed_version": __version__, "git_commit": git_commit(),
        "mpi_library": "Open MPI v4.1.4", "world_size": 4, "hosts": ["n1"],
        "config_sha256": hashlib.sha256(canonical.encode()).hexdigest()}
    old = {k: v for k, v in record.to_dict().items() if k != "environment"}
    assert Record.from_dict(old).environment == {}  # records written before it still read
