"""The cost model against hand-computed values; the scaling suite and plots end to end."""

from __future__ import annotations

import csv
import json

import pytest
from helpers import run_cli, run_mpi, write_dataset

from mpifed.benchmarks.predict import measured_efficiency


def test_scaling_points_model_and_plots(tmp_path):
    write_dataset(tmp_path / "d.h5", 4000, seed=0, features=784, classes=10, shift=0.0,
                  dtype="float32", num_classes=False)
    for ranks in (1, 2):
        done = run_mpi(ranks, ["bench", "scaling", "--data", "d.h5", "--csv", "s.csv",
                               "--steps", "10", "--hidden", "32", "--batch", "64"], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
    with open(tmp_path / "s.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["ranks"] for r in rows] == ["1", "2"]
    for row in rows:
        shares = [float(row[k]) for k in ("compute_fraction", "data_fraction", "comm_fraction")]
        assert sum(shares) == pytest.approx(1.0) and all(0 <= s <= 1 for s in shares)
    expected = float(rows[1]["samples_per_s"]) / (2 * float(rows[0]["samples_per_s"]))
    assert float(rows[1]["efficiency"]) == pytest.approx(expected, abs=1e-4)
    effs, compute = measured_efficiency(str(tmp_path / "s.csv"))
    assert set(effs) == {1, 2} and compute > 0
    done = run_mpi(2, ["bench", "model", "--scaling-csv", "s.csv", "--json", "m.json"],
                   cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    model = json.loads((tmp_path / "m.json").read_text())
    assert [p["ranks"] for p in model["predictions"]][-1] == 1024
    assert model["model"]["alpha"] > 0 and model["model"]["beta"] > 0
    (tmp_path / "scaling.json").write_text(json.dumps({"rows": rows, "model": model}))
    done = run_cli(["plot", "scaling.json", "--out", "plots"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("speedup.png", "efficiency.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_allreduce_json_plots(tmp_path):
    done = run_mpi(2, ["bench", "allreduce", "-b", "1K", "-e", "64K", "-f", "8", "-n", "3",
                       "--json", "ar.json"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads((tmp_path / "ar.json").read_text())["rows"]
    assert all(r[a]["wrong"] == 0 for r in rows for a in ("ring", "mpi", "hierarchical", "auto"))
    done = run_cli(["plot", "--allreduce", "ar.json", "--out", "."], cwd=tmp_path)
    assert done.returncode == 0 and (tmp_path / "busbw-2.png").exists()


def test_plot_without_inputs_is_a_clear_error(tmp_path):
    done = run_cli(["plot"], cwd=tmp_path)
    assert done.returncode == 1 and "nothing to plot" in done.stderr
