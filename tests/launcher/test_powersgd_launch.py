"""comm.compression = "powersgd" through `mpifed train`: on the digits MLP 64-512-256-10 it
sends >= 20x fewer bytes per step at rank 2 and ends within a point of uncompressed accuracy,
and a killed run resumes to the same bits (the error feedback and Q ride in the checkpoint)."""

from __future__ import annotations

import pytest
from helpers import assert_same_bits, read_metrics, run_cli, run_mpi, write_config

pytest.importorskip("sklearn")

TRAIN = {
    "data": {"train": "data/train.h5", "test": "data/test.h5"},
    "model": {"kind": "mlp", "hidden": [512, 256]},
    "optim": {"lr": 0.05, "momentum": 0.9, "batch_size": 16},
    "comm": {"allreduce": "ring"},
    "run": {"log_every": 1000},
}


@pytest.fixture
def digits(tmp_path):
    assert run_cli(["data", "digits", "data"], cwd=tmp_path).returncode == 0
    return tmp_path


def test_powersgd_matches_uncompressed_accuracy_with_20x_fewer_bytes(digits):
    summaries = {}
    for name in ("none", "powersgd"):
        write_config(digits / f"{name}.toml", TRAIN,
                     {"optim": {"epochs": 10}, "comm": {"compression": name},
                      "run": {"out": name}})
        done = run_mpi(2, ["train", f"{name}.toml"], cwd=digits)
        assert done.returncode == 0, done.stderr
        summaries[name] = read_metrics(digits / name, "summary")[-1]
    plain, low_rank = summaries["none"], summaries["powersgd"]
    assert low_rank["accuracy"] >= plain["accuracy"] - 0.01, (low_rank, plain)
    # every step counted, the first 10 (compression_start) uncompressed among them
    assert low_rank["compression_ratio"] >= 20, low_rank["compression_ratio"]
    per_step = low_rank["bytes_sent_per_step"]
    assert len(per_step) == 2 and per_step[0] == per_step[1]
    assert plain["bytes_sent_per_step"][0] / per_step[0] == pytest.approx(
        low_rank["compression_ratio"])


def test_a_killed_powersgd_run_resumes_to_the_same_bits(digits):
    for out in ("full", "cut"):
        write_config(digits / f"{out}.toml", TRAIN,
                     {"optim": {"steps": 70}, "comm": {"compression": "powersgd"},
                      "run": {"out": out, "checkpoint_every": 20}})
    assert run_mpi(2, ["train", "full.toml"], cwd=digits).returncode == 0
    killed = run_mpi(2, ["train", "cut.toml"], cwd=digits,
                     env={"MPIFED_FAULT": "kill:step=47:rank=1"})
    assert killed.returncode != 0, "the fault did not kill the run"
    done = run_mpi(2, ["train", "cut.toml"], cwd=digits)
    assert done.returncode == 0, done.stderr
    assert "resumed at step 40" in done.stdout
    assert_same_bits(digits / "cut" / "model.h5", digits / "full" / "model.h5")
