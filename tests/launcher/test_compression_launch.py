"""comm.compression end to end: a killed fp16 run resumes to the same bits, and the summary's
bytes_sent_per_step and compression_ratio equal the ring's volume counted by hand."""

from __future__ import annotations

import pytest
from helpers import assert_same_bits, read_metrics, run_mpi, write_config, write_dataset

from mpifed.comm.ring import chunk_bounds, ring_bytes_sent
from mpifed.nn.models import ModelSpec

FEATURES, HIDDEN, CLASSES = 20, 16, 4
TRAIN = {
    "data": {"train": "d.h5"},
    "model": {"kind": "mlp", "hidden": [HIDDEN], "dtype": "float32"},
    "optim": {"lr": 0.02, "momentum": 0.9, "batch_size": 8},
    "run": {"log_every": 500},
}


def write_data(path):
    write_dataset(path, 1200, seed=2, features=FEATURES, classes=CLASSES, shift=1.0,
                  dtype="float32")


def model_size() -> int:
    return ModelSpec("mlp", FEATURES, (HIDDEN,), CLASSES).layout("float32").size


def half_ring_bytes(m: int, tail: int, size: int, rank: int) -> int:
    """The half ring's wire: m 2-byte items, the float32 tail as 2 items each in the last
    chunk; a rank sends it twice less its own chunk and the next rank's."""
    chunks = [b - a for a, b in chunk_bounds(m, size)]
    chunks[-1] += 2 * tail
    return 2 * (2 * sum(chunks) - chunks[rank] - chunks[(rank + 1) % size])


def test_a_killed_fp16_run_resumes_to_the_same_bits(tmp_path):
    write_data(tmp_path / "d.h5")
    for out in ("full", "cut"):
        write_config(tmp_path / f"{out}.toml", TRAIN,
                     {"optim": {"steps": 90}, "comm": {"compression": "fp16"},
                      "run": {"out": out, "checkpoint_every": 20}})
    assert run_mpi(3, ["train", "full.toml"], cwd=tmp_path).returncode == 0
    killed = run_mpi(3, ["train", "cut.toml"], cwd=tmp_path,
                     env={"MPIFED_FAULT": "kill:step=53:rank=1"})
    assert killed.returncode != 0, "the fault did not kill the run"
    assert not (tmp_path / "cut" / "model.h5").exists()
    done = run_mpi(3, ["train", "cut.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "resumed at step 40" in done.stdout
    assert_same_bits(tmp_path / "cut" / "model.h5", tmp_path / "full" / "model.h5")


@pytest.mark.parametrize("comm,ranks", [({"allreduce": "ring"}, 3), ({"allreduce": "mpi"}, 3),
                                        ({"compression": "fp16"}, 3),
                                        ({"compression": "bf16", "predivide": False}, 2)])
def test_the_summary_counts_the_bytes_each_rank_sent(tmp_path, comm, ranks):
    write_data(tmp_path / "d.h5")
    write_config(tmp_path / "run.toml", TRAIN, {"optim": {"steps": 6}, "comm": comm})
    done = run_mpi(ranks, ["train", "run.toml"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = read_metrics(tmp_path / "runs/latest", "summary")[-1]
    n = model_size()
    fp32 = [ring_bytes_sent(n + 2, 4, ranks, r) for r in range(ranks)]  # gradients + 2 slots
    if "compression" not in comm:  # the ring's bytes, or MPI_Allreduce's ring equivalent
        assert summary["bytes_sent_per_step"] == fp32
        assert summary["compression_ratio"] == 1.0
        return
    half = [half_ring_bytes(n, 2, ranks, r) for r in range(ranks)]
    assert summary["bytes_sent_per_step"] == half
    assert summary["compression_ratio"] == pytest.approx(sum(fp32) / sum(half))
    assert 1.95 < summary["compression_ratio"] < 2.0  # the slots travel at full width
