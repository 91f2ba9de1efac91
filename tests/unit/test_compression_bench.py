"""The compression-over-a-slow-link benchmark's arithmetic (mpifed/benchmarks/compression_link.py):
the model's size and the table's medians and ratios, without launching anything."""

from __future__ import annotations

import pytest

from mpifed.benchmarks.compression_link import parameter_count, summarise, worker_command
from mpifed.benchmarks.harness import Timing
from mpifed.benchmarks.memory import SIZES


def test_the_default_model_is_the_46m_parameter_mlp():
    # 2048*4096 + 4096*4096*2 + 4096*1024 + 1024*10 weights, plus 4096*3 + 1024 + 10 biases
    assert parameter_count(SIZES) == 46_160_906


def run(seconds: dict, sent: dict) -> dict:
    return {"schemes": {s: {"timing": Timing(3, 5, 64, [t], [t], [t / 2]).to_dict(),
                            "bytes_per_step": sent[s]} for s, t in seconds.items()}}


def test_ratios_are_taken_inside_each_launch_then_the_median():
    runs = [run({"none": 4.0, "powersgd": 1.0}, {"none": 100, "powersgd": 1}),
            run({"none": 8.0, "powersgd": 4.0}, {"none": 100, "powersgd": 1}),  # a busy launch
            run({"none": 3.0, "powersgd": 1.0}, {"none": 100, "powersgd": 1})]
    rows = {r["scheme"]: r for r in summarise(runs, ["none", "powersgd"])}
    assert rows["powersgd"]["ratios"] == [4.0, 2.0, 3.0]
    assert rows["powersgd"]["ratio"] == 3.0 and rows["none"]["ratio"] == 1.0
    assert rows["powersgd"]["samples_per_s"] == pytest.approx(64 / 1.0)  # median of 64, 16, 64
    assert rows["none"]["step_s"] == 4.0 and rows["none"]["comm_fraction"] == 0.5
    assert rows["none"]["cpu_s"] == 4.0  # the CPU clock, as Timing recorded it


def test_a_shaped_launch_wraps_mpiexec_in_the_namespace():
    args = type("Args", (), {"nodes": 2, "per_node": 1, "schemes": ["none"], "steps": 1,
                             "warmup": 1, "batch": 4, "sizes": SIZES, "powersgd_rank": 2,
                             "allreduce": "ring", "rate": "1gbit"})()
    shaped = worker_command(args, 0)
    assert shaped[:2] == ["unshare", "--net"] and "1gbit" in shaped
    args.rate = "none"
    assert worker_command(args, 0)[0].endswith("mpiexec")
