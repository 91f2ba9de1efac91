"""`mpifed train` with comm.allreduce = "auto" measures once per topology, says what it chose in
the summary (allreduce_choice), caches it, and a second run reads the cache without measuring;
a forced algorithm measures nothing."""

from __future__ import annotations

from helpers import read_metrics, run_mpi, write_config, write_dataset


def write_run(folder, algorithm: str, overlap: bool = False) -> None:
    write_dataset(folder / "d.h5", 40, seed=1, features=6, classes=3)
    write_config(folder / "run.toml", {
        "data": {"train": "d.h5"},
        "model": {"kind": "mlp", "hidden": [5]},
        "optim": {"lr": 0.05, "batch_size": 4, "steps": 3},
        "comm": {"allreduce": algorithm, "overlap": overlap},
        "run": {"seed": 1, "out": "out", "log_every": 0},
    })


def test_auto_measures_caches_and_the_next_run_reads_the_cache(tmp_path):
    write_run(tmp_path, "auto", overlap=True)
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache"), "MPIFED_AUTOTUNE": "1"}
    first = run_mpi(2, ["train", "run.toml"], cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    assert "comm.allreduce auto: measured 2 size(s)" in first.stderr
    [cached] = (tmp_path / "cache" / "mpifed").glob("allreduce-*.json")
    before = cached.read_bytes()
    choice = read_metrics(tmp_path / "out", "summary")[-1]["allreduce_choice"]
    # the two layers' gradients (w1 b1: 35 floats; w2 b2 with loss and stop: 20) in buckets
    assert set(choice) == {"128", "64"} and set(choice.values()) <= {"ring", "mpi",
                                                                     "hierarchical"}
    second = run_mpi(2, ["train", "run.toml", "--set", "run.out=out2"], cwd=tmp_path, env=env)
    assert second.returncode == 0, second.stderr
    assert "comm.allreduce auto: read from the cache" in second.stderr
    assert "nothing measured" in second.stderr and "measured 2" not in second.stderr
    assert cached.read_bytes() == before  # not rewritten
    assert read_metrics(tmp_path / "out2", "summary")[-1]["allreduce_choice"] == choice


def test_a_forced_algorithm_measures_nothing(tmp_path):
    write_run(tmp_path, "ring")
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    done = run_mpi(2, ["train", "run.toml"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    assert "comm.allreduce auto" not in done.stderr
    assert not (tmp_path / "cache").exists()
    summary = read_metrics(tmp_path / "out", "summary")[-1]
    assert set(summary["allreduce_choice"].values()) == {"ring"}
