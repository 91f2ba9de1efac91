"""Issue 28's goals at small sizes, launched as users do (`python bench/federated_goals.py`):
on a Dirichlet(0.1) split over 5 institutions, FedPer's and Ditto's mean per-institution
accuracy beats the global FedAvg model's by more than 5 points; with one bad institution of 5
(x100), FedAvg collapses while the robust rules stay near the clean run. Accuracy only: nothing
here depends on how fast a round is."""

from __future__ import annotations

import os
import subprocess
import sys

from helpers import ROOT

TIMEOUT = 600  # a dozen short federations on a loaded machine


def bench(args: list[str]) -> list[list[str]]:
    """Run the benchmark; return its table rows, split into cells."""
    done = subprocess.run([sys.executable, "bench/federated_goals.py", *args],
                          capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr
    return [line.split() for line in done.stdout.splitlines() if line.startswith("  ")]


def percent(cell: str) -> float:
    return float(cell.rstrip("%"))


def test_personalisation_beats_the_global_model_on_dirichlet_sites():
    rows = {" ".join(r[:-3]): r[-3:] for r in bench(["--goal", "personal", "--quick"])}
    base = percent(rows["fedavg (global)"][0])
    # 6 rounds x 5 steps, 200 rows a site: seen +38 points (FedPer) and +40 (Ditto); the goal
    # asks for 5; the worst institution's is printed beside the mean
    for name in ("fedper", "ditto", "fedper + finetune"):
        mean, worst = percent(rows[name][0]), percent(rows[name][1])
        assert mean >= base + 5, (name, mean, base)
        assert worst <= mean


def test_one_bad_institution_of_five_collapses_fedavg_not_the_robust_rules():
    rows = bench(["--goal", "robust", "--rounds", "12", "--local-steps", "8",
                  "--modes", "scale:100"])
    five = {r[-3]: percent(r[-2]) for r in rows if r[0] == "5,"}
    clean = next(percent(r[-2]) for r in rows if r[:3] == ["5", "institutions,", "clean"])
    assert five["fedavg"] < clean - 30  # seen: 95.0 clean, 26.3 steered (20 rounds)
    for rule in ("fedmedian", "fedtrimmedavg", "multikrum"):
        assert five[rule] >= clean - 2, (rule, five[rule], clean)
    # Krum keeps one institution's model: seen 1.6 points under at 20 rounds, more when fewer
    assert five["krum"] >= clean - 5, (five["krum"], clean)
    eleven = {r[-3]: percent(r[-2]) for r in rows if r[0] == "11,"}
    clean11 = next(percent(r[-2]) for r in rows if r[:3] == ["11", "institutions,", "clean"])
    assert eleven["fedavg"] < clean11 - 30 and eleven["bulyan"] >= clean11 - 2
