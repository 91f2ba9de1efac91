"""What a run records of itself: the loss window of step records, config.toml's header (read
back as the same config) and the environment fields (on COMM_SELF)."""

from __future__ import annotations

import hashlib
import json
import math
import socket
import time

import pytest
from mpi4py import MPI

from mpifed import __version__
from mpifed.config import load_config, resolve, to_toml
from mpifed.train.environment import (
    config_header,
    config_sha256,
    gather_hosts,
    git_commit,
    run_environment,
    split_header,
)
from mpifed.train.report import LossWindow, Reporter


def test_the_window_is_the_mean_since_the_last_take():
    window = LossWindow()
    assert math.isnan(window.take())
    for loss in (1.0, 2.0, 6.0):
        window.add(loss)
    assert window.take() == 3.0
    window.add(0.5)
    assert window.take() == 0.5


def test_step_records_carry_time_and_the_window_average(tmp_path):
    losses = [4.0, 2.0, 3.0, 1.0, 5.0, 0.5, 7.0]
    reporter = Reporter(str(tmp_path), True, len(losses), "none")
    before = time.time()
    for step, loss in enumerate(losses, 1):
        reporter.step(step, 0, loss, 0.1, 1.0, 0.0, log=step % 3 == 0 or step == len(losses))
    reporter.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [3, 6, 7]
    assert [r["loss"] for r in records] == [3.0, 0.5, 7.0]
    want = [sum(losses[0:3]) / 3, sum(losses[3:6]) / 3, 7.0]  # by hand: the steps of each window
    assert [r["loss_avg"] for r in records] == pytest.approx(want, rel=1e-12)
    assert all(before <= r["time"] <= time.time() for r in records)
    assert [r["time"] for r in records] == sorted(r["time"] for r in records)


CONFIG = {"data": {"train": "sites/site-{institution}.h5"}, "model": {"kind": "mlp", "hidden": [16, 4]},
          "optim": {"steps": 7}, "run": {"out": 'a "quoted" dir'}}
ENV = {"mpifed_version": "0.1.0", "git_commit": None, "mpi_library": 'Open MPI v4.1.6, "x"',
       "world_size": 2, "hosts": ["node-a", "node-b"], "config_sha256": "ab" * 32}


def test_the_header_reads_back_and_the_config_loads_the_same(tmp_path):
    cfg = resolve(CONFIG)
    body = to_toml(cfg)
    text = config_header(ENV) + body
    written = tmp_path / "config.toml"
    written.write_text(text)
    assert load_config(str(written)) == cfg  # comments in TOML: the same config
    fields, rest = split_header(text)
    assert rest == body
    assert fields == {k: v for k, v in ENV.items() if v is not None}  # None is left out
    assert all(line.startswith("#") for line in text[:len(text) - len(body) - 1].splitlines())


def test_config_sha256_is_the_hash_of_the_body_after_the_header(tmp_path):
    cfg = resolve(CONFIG)
    env = run_environment(cfg, MPI.COMM_SELF)
    text = config_header(env) + to_toml(cfg)
    _, body = split_header(text)
    assert env["config_sha256"] == hashlib.sha256(body.encode()).hexdigest()
    assert env["config_sha256"] == config_sha256(to_toml(cfg))


def test_the_environment_on_one_rank():
    env = run_environment(resolve(CONFIG), MPI.COMM_SELF)
    assert list(env) == ["mpifed_version", "git_commit", "mpi_library", "world_size", "hosts",
                         "config_sha256"]
    assert env["mpifed_version"] == __version__ and env["world_size"] == 1
    assert env["mpi_library"] == MPI.Get_library_version().splitlines()[0].strip()
    assert env["hosts"] == [MPI.Get_processor_name()] == gather_hosts(MPI.COMM_SELF)
    assert socket.gethostname().split(".")[0] in env["hosts"][0]


@pytest.mark.parametrize("private", [{"dp": {}}, {"secure_aggregation": True}])
def test_no_hosts_under_dp_or_secure_aggregation(private):
    raw = dict(CONFIG, federated={"institution_sizes": [1], **private})
    env = run_environment(resolve(raw), MPI.COMM_SELF)
    assert "hosts" not in env and env["world_size"] == 1


def test_no_commit_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert git_commit(str(tmp_path)) is None  # no .git: a parent's repository is not ours
    (tmp_path / ".git").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "nowhere"))  # git absent
    assert git_commit(str(tmp_path)) is None
