"""The benchmark harness launched for real: ours and the torch peer through one timing with the
same warm-up, and a small throughput run of ours."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from mpifed.benchmarks.harness import Steps, Timing


class Calls:
    """A fake step and sync that log every call in order."""

    def __init__(self):
        self.log = []

    def step(self, i):
        self.log.append(("step", i))

    def sync(self):
        self.log.append(("sync",))


@pytest.mark.parametrize("module", ["train_throughput", "cnn_throughput", "gpu_throughput"])
def test_ours_and_the_peer_run_through_one_timing_with_the_same_warmup(module, monkeypatch):
    import importlib

    bench = importlib.import_module(f"mpifed.benchmarks.{module}")
    taken = {}

    def fake(impl):
        @contextmanager
        def sides(*args, **kwargs):
            calls = taken.setdefault(impl, Calls())
            yield Steps(calls.step, calls.sync)
        return sides

    for impl in bench.SIDES:
        monkeypatch.setitem(bench.SIDES, impl, fake(impl))
    for impl in bench.SIDES:
        if module == "train_throughput":
            bench.run_worker(impl, "d.h5", 4, 3, "out")
        elif module == "cnn_throughput":
            bench.run_worker_steps(impl, "lenet5", "d.h5", 4, 3, "out", "numpy")
        else:
            bench.run_worker(impl, "d.h5", 4, 3, 128, "out")
    assert "torch" in taken and len(taken) == len(bench.SIDES)
    for impl, calls in taken.items():  # 3 warm-up steps, sync, 4 timed, sync: for every impl
        assert calls.log == [*[("step", i) for i in range(3)], ("sync",),
                             *[("step", i) for i in range(3, 7)], ("sync",)], impl


def test_throughput_ours_runs_two_warmup_and_two_timed_steps(tmp_path):
    """Ours for real, on one rank in this process (no mpiexec, no torch)."""
    from mpifed.benchmarks import train_throughput as tt
    from mpifed.benchmarks.mlp import CLASSES, FEATURES
    from mpifed.data.synth import write_synthetic

    data = str(tmp_path / "bench.h5")
    write_synthetic(data, 512, FEATURES, CLASSES, seed=0)
    got = tt.run_worker("ours", data, 2, 2, str(tmp_path / "out"))
    timing = Timing.from_dict(got["timing"])
    assert (timing.warmup, timing.steps, timing.samples_per_step) == (2, 2, tt.BATCH)
    assert got["samples_per_s"] > 0 and 0 <= got["comm_fraction"] <= 1


def test_gpu_bench_without_a_gpu_says_so_and_measures_nothing(capsys):
    """This machine has no CUDA device: `mpifed bench gpu` ends at once, exit 0, one line."""
    from mpifed.benchmarks import gpu_throughput as bench

    assert bench.gpu_count()[0] == 0  # the premise: a CPU machine
    assert bench.main(["--models", "resnet8", "--precisions", "fp16"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "skipped, nothing measured" in out[0] and "CuPy" in out[0]


def test_gpu_bench_worker_times_every_case_and_reports_a_failed_one(monkeypatch, capsys):
    """The worker runs every (model, precision) in one launch; a case its backend refuses
    prints its error in its own row, and the next case still runs."""
    import argparse
    import json

    from mpifed.benchmarks import gpu_throughput as bench

    seen = []

    @contextmanager
    def sides(data, steps, batch, out, comm, model, precision):
        seen.append((data.rsplit("/", 1)[-1], model, precision, steps, batch))
        if precision == "bf16":
            raise RuntimeError("no bf16 here")
        calls = Calls()
        yield Steps(calls.step, calls.sync)
    monkeypatch.setitem(bench.SIDES, "ours", sides)
    args = argparse.Namespace(steps=4, warmup=3, batch=128)
    bench.run_cases("ours", "/tmp/x", [("lenet5", "fp16"), ("resnet8", "bf16"),
                                       ("resnet20", "fp32")], args)
    assert seen == [("lenet5.h5", "lenet5", "fp16", 7, 128), ("resnet8.h5", "resnet8", "bf16",
                                                                7, 128),
                    ("resnet20.h5", "resnet20", "fp32", 7, 128)]
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["model"], r["precision"], "error" in r) for r in rows] == [
        ("lenet5", "fp16", False), ("resnet8", "bf16", True), ("resnet20", "fp32", False)]
    assert "no bf16 here" in rows[1]["error"] and rows[0]["samples_per_s"] > 0
