"""Every script in bench/ is a thin caller of an `mpifed bench` benchmark: the code lives in
mpifed/benchmarks/ (where the one harness times it), the script only calls its `main`."""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path

import pytest

from mpifed.cli.main import BENCHMARKS

BENCH = Path(__file__).resolve().parents[2] / "bench"
MOST_LINES = 15  # docstring, one import, the __main__ guard


def called_module(path: Path) -> str | None:
    """Return X of the script's `from mpifed.benchmarks.X import main`, or None."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "mpifed.benchmarks.") and [a.name for a in node.names] == ["main"]:
            return node.module.removeprefix("mpifed.benchmarks.")
    return None


@pytest.mark.parametrize("path", sorted(p for p in BENCH.iterdir() if p.is_file()),
                         ids=lambda p: p.name)
def test_every_bench_script_is_a_thin_caller_of_a_registered_benchmark(path):
    if path.suffix == ".sh":
        pytest.skip("a shell sweep over `mpifed bench` commands, not a Python entry point")
    assert path.suffix == ".py", f"bench/{path.name}: a benchmark is a .py thin caller"
    module = called_module(path)
    assert module, f"bench/{path.name}: import main from mpifed.benchmarks.<module>"
    assert importlib.util.find_spec(f"mpifed.benchmarks.{module}"), f"no {module} module"
    assert module in BENCHMARKS.values(), \
        f"bench/{path.name}: register {module} in BENCHMARKS (mpifed/cli/main.py)"
    assert callable(importlib.import_module(f"mpifed.benchmarks.{module}").main)
    lines = len(path.read_text().splitlines())
    assert lines <= MOST_LINES, \
        f"bench/{path.name} has {lines} lines: move its code to mpifed/benchmarks/{module}.py"


def test_every_registered_benchmark_has_a_main():
    for which, module in BENCHMARKS.items():
        assert callable(importlib.import_module(f"mpifed.benchmarks.{module}").main), which


@pytest.mark.parametrize("which", ["memory", "streaming", "shuffle-order"])
def test_the_moved_benchmarks_answer_to_mpifed_bench(which):
    assert BENCHMARKS[which] == which.replace("-", "_")


class FakeComm:
    """One rank; logs barriers."""

    size, rank = 1, 0

    def __init__(self, log):
        self.log = log

    def Barrier(self):  # noqa: N802 (mpi4py's name)
        self.log.append("sync")


class FakeLoader:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def get(self):
        self.log.append(self.name)
        return None, self.name, None


def test_streaming_loaders_warm_up_alike_and_every_turn_is_timed():
    from mpifed.benchmarks import streaming

    log = []
    loaders = [FakeLoader(name, log) for name in "abc"]
    numbers = []
    timings = streaming.take_turns(loaders, lambda x, y, opt, lr, t: numbers.append(t), None,
                                   FakeComm(log), rounds=2, chunk=3, warmup=2)
    # round 0: a, b, c each warm up 2 steps then run 3 timed; round 1 starts with c
    turns = [["sync", *[n] * 3, "sync"] for n in "abc"]
    expected = [*([n] * 2 + turn for n, turn in zip("abc", turns))]
    round1 = [turns[2], turns[0], turns[1]]
    assert log == [x for t in expected for x in t] + [x for t in round1 for x in t]
    assert numbers == list(range(1, 1 + 3 * (2 + 3) + 3 * 3))  # step numbers never repeat
    assert [(t.warmup, t.steps, len(t.seconds)) for t in timings] == [(2, 3, 2)] * 3


def test_memory_sizes_parse_and_name_the_fix():
    from mpifed.benchmarks.memory import SIZES, parse_sizes, sizes_text

    assert parse_sizes("2048,4096,4096,4096,1024,10") == SIZES
    assert parse_sizes("16,4") == (16, (), 4) and sizes_text((16, (8,), 4)) == "16,8,4"
    for bad in ("16", "16,x,4", "16,0,4"):
        with pytest.raises(ValueError, match="--sizes"):
            parse_sizes(bad)


def test_memory_row_takes_the_worst_rank_the_median_run_and_the_goal():
    from mpifed.benchmarks.memory import MIB, stage_row

    def rank(rss, step, optim=100):
        return {"param_bytes": 10, "grad_bytes": 20, "optimizer_state_bytes": optim,
                "peak_rss_bytes": rss, "step_s": step, "n": 2 ** 20, "widest": 2 ** 10}

    runs = [[rank(5, 0.3), rank(7, 0.5)], [rank(9, 0.1), rank(2, 0.2)], [rank(1, 0.9)] * 2]
    row = stage_row(2, "parameters", runs, base=0.25)
    assert row["peak_rss_bytes"] == 9  # the run with the largest peak, its worst rank
    assert (row["step_s"], row["low"], row["high"]) == (0.5, 0.2, 0.9)  # runs' slowest ranks
    assert row["vs_none"] == pytest.approx(2.0)
    assert row["goal_mib"] == pytest.approx((16 * 2 ** 20 / 2 + 16 * 2 ** 10) * MIB + 100)
    assert row["vs_1_over_p"] == pytest.approx(100 / (8 * 2 ** 20 / 2))
    assert stage_row(2, "none", runs, base=None)["vs_none"] == 1.0
