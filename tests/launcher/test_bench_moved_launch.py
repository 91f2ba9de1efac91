"""The memory, streaming and shuffle-order benchmarks at their smallest sizes, launched as users
do (`python bench/X.py`, `mpifed bench X`): their tables have the documented columns and their
records the harness's fields. Nothing here depends on how fast a step is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from helpers import ROOT, run_cli

from mpifed.benchmarks.harness import FIELDS, read_records
from mpifed.benchmarks.memory import STAGES
from mpifed.benchmarks.streaming import LOADERS

TIMEOUT = 120  # each run takes seconds; a loaded machine must not fail it


def run_bench_script(name: str, args: list[str]):
    """Run `python bench/NAME.py ARGS` from the repository root."""
    return subprocess.run([sys.executable, f"bench/{name}.py", *args], capture_output=True,
                          text=True, timeout=TIMEOUT, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


def table(stdout: str) -> tuple[list[str], list[str]]:
    """Return the '# ' header lines and the rows of a harness table."""
    lines = stdout.splitlines()
    return [x for x in lines if x.startswith("# ")], [x for x in lines if x.startswith("  ")]


def test_memory_on_one_rank_prints_every_stage_and_writes_records(tmp_path):
    records = tmp_path / "runs.jsonl"
    done = run_bench_script("memory", ["--ranks", "1", "--steps", "2", "--warmup", "1",
                                       "--sizes", "16,8,4", "--batch", "4",
                                       "--records", str(records)])
    assert done.returncode == 0, done.stderr
    headers, rows = table(done.stdout)
    for column in ("p", "stage", "param MiB", "grad MiB", "optim MiB", "vs 1/p",
                   "peak RSS MiB", "goal MiB", "step s", "vs none"):
        assert column in headers[0], column
    assert [r.split()[:2] for r in rows] == [["1", s] for s in STAGES]
    got = read_records(str(records))
    assert [r.impl for r in got] == list(STAGES)
    for r in got:
        assert set(r.to_dict()) == set(FIELDS) and r.benchmark == "memory" and r.ranks == 1
        assert (r.warmup, r.steps, r.repeats) == (1, 1, 2)  # a step per repeat: median step
        assert r.config["shard"] == r.impl and r.config["model"] == "mlp 16,8,4"
        assert {"param_bytes", "grad_bytes", "optimizer_state_bytes", "peak_rss_bytes",
                "goal_mib"} <= set(r.metrics)


def test_memory_interleaved_on_two_ranks(tmp_path):
    records = tmp_path / "runs.jsonl"
    done = run_cli(["bench", "memory", "--interleaved", "--ranks", "2", "--steps", "2",
                    "--warmup", "1", "--sizes", "16,8,4", "--batch", "4",
                    "--records", str(records)], timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    headers, rows = table(done.stdout)
    for column in ("p", "stage", "median step s", "vs none", "range s"):
        assert column in headers[0], column
    assert [r.split()[:2] for r in rows] == [["2", s] for s in STAGES]
    got = read_records(str(records))
    assert [(r.impl, r.ranks, r.warmup, r.repeats) for r in got] == \
        [(s, 2, 1, 2) for s in STAGES]
    assert all(r.config["interleaved"] for r in got)


def test_streaming_tiny_prints_every_loader_and_writes_records(tmp_path):
    records = tmp_path / "runs.jsonl"
    # --warm: the test must not drop the shared machine's page cache (it may run as root)
    done = run_cli(["bench", "streaming", "--samples", "1200", "--rounds", "1", "--chunk", "2",
                    "--warmup", "1", "--ranks", "1", "--warm", "--dir", str(tmp_path),
                    "--records", str(records)], timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    headers, rows = table(done.stdout)
    for column in ("ranks", "loader", "samples/s", "data wait s", "CPU ms/step", "read KiB",
                   "read MB/s", "page cache"):
        assert column in headers[1], column
    assert [r[8:28].strip() for r in rows] == list(LOADERS)
    assert all(r.endswith("kept (--warm)") for r in rows)
    assert "# 1 rank(s): streamed+shuffled / in-memory shuffled = " in done.stdout
    got = read_records(str(records))
    assert [r.impl for r in got] == list(LOADERS)
    for r in got:
        assert r.benchmark == "streaming" and (r.warmup, r.steps, r.repeats) == (1, 2, 1)
        assert {"data_wait_s", "cpu_ms_per_step", "read_kib", "read_mb_s"} <= set(r.metrics)


def test_shuffle_order_stats_print_the_table_and_the_json(tmp_path):
    out = tmp_path / "order.json"
    done = run_cli(["bench", "shuffle-order", "--rows", "2000", "--skip-digits",
                    "--json", str(out)], timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    headers, rows = table(done.stdout)
    for column in ("order", "corr(pos e, pos e+1)", "corr(pos, row)", "neighbours together"):
        assert column in headers[1], column
    names = ["full permutation (in memory)", "blocks 334 x buffer 4", "blocks 334 x buffer 256"]
    assert [r[2:32].strip() for r in rows] == names
    got = json.loads(out.read_text())
    assert [r["order"] for r in got["orders"]] == names and got["digits"] == []
    assert set(got["orders"][0]) == {"order", "corr_epochs", "corr_row", "neighbours_together"}
