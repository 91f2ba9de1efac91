"""A 2-rank run's metrics: step records with `time` and `loss_avg` (checked against the step
losses of the same run logged at every step), and the summary's environment fields (checked
against OUT/config.toml as written, and against git and MPI asked directly)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import pytest
from helpers import ROOT, read_metrics, run_mpi, write_config, write_dataset

from mpifed import __version__

STEPS = 10


def train(tmp_path, out: str, log_every: int):
    write_config(tmp_path / f"{out}.toml", {
        "data": {"train": "d.h5"},
        "model": {"kind": "mlp", "hidden": [5]},
        "optim": {"batch_size": 4, "steps": STEPS, "lr": 0.1},
        "run": {"seed": 3, "out": out, "log_every": log_every},
    })
    done = run_mpi(2, ["train", f"{out}.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return read_metrics(tmp_path / out)


def body_after_header(text: str) -> str:
    """config.toml without its header: the leading '#' lines and the blank line after them."""
    lines = text.split("\n")
    n = next(i for i, line in enumerate(lines) if not line.startswith("#"))
    assert lines[n] == ""
    return "\n".join(lines[n + 1:])


def test_step_records_and_the_summary_environment(tmp_path):
    write_dataset(tmp_path / "d.h5", 60, seed=5, features=6, classes=3)
    every = [r for r in train(tmp_path, "every", 1) if r["event"] == "step"]
    records = train(tmp_path, "third", 3)
    steps = [r for r in records if r["event"] == "step"]
    loss = {r["step"]: r["loss"] for r in every}
    assert sorted(loss) == list(range(1, STEPS + 1))
    assert all(r["loss_avg"] == pytest.approx(r["loss"], rel=1e-12) for r in every)
    assert [r["step"] for r in steps] == [3, 6, 9, 10]
    previous = 0
    for r in steps:
        assert r["loss"] == loss[r["step"]]  # the same seed: the same losses
        window = [loss[s] for s in range(previous + 1, r["step"] + 1)]
        assert r["loss_avg"] == pytest.approx(sum(window) / len(window), rel=1e-12)
        previous = r["step"]
    times = [r["time"] for r in steps]
    assert times == sorted(times) and times[0] > 1.6e9  # seconds since the epoch

    summary = records[-1]
    assert summary["event"] == "summary" and summary["world_size"] == 2
    text = (tmp_path / "third" / "config.toml").read_text()
    body = body_after_header(text)
    assert summary["config_sha256"] == hashlib.sha256(body.encode("utf-8")).hexdigest()
    assert summary["mpifed_version"] == __version__
    assert isinstance(summary["mpi_library"], str) and summary["mpi_library"]
    assert len(summary["hosts"]) == 1 and summary["hosts"][0]  # both ranks on this machine
    for key in ("mpifed_version", "git_commit", "mpi_library", "world_size", "hosts",
                "config_sha256"):
        line = next((x for x in text.split("\n") if x.startswith(f"# {key} = ")), None)
        if summary[key] is None:
            assert line is None, key  # TOML has no null: left out of the header
        else:
            assert json.loads(line.split(" = ", 1)[1]) == summary[key], key
    if (ROOT / ".git").exists() and shutil.which("git"):
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=True).stdout.strip()
        assert summary["git_commit"] == head
