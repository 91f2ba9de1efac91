"""`mpifed plot --run RUN_DIR`: a run's loss and accuracy curves as PNG.

A data-parallel run is plotted against steps (`step` records: loss and its window average
`loss_avg`; `eval` records: test accuracy). A federation is plotted against rounds (the root's
`round` records: the global model's test accuracy and loss, and the institutions' mean training
loss where the root holds it). Each institution folder (`OUT/institution-K/`, written under DP
or secure aggregation) gets its own figures, written into that folder and never drawn into the
root's: the privacy rule of docs/privacy.md keeps an institution's figures with it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import UserError


def read_records(path: Path) -> list[dict]:
    """Return the JSON records of a metrics.jsonl file; a torn last line is skipped."""
    records = []
    with path.open() as fh:
        for number, line in enumerate(fh, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if fh.readline():  # only the last line may be torn (a killed run)
                    raise UserError(f"{path}: line {number} is not JSON; is this an mpifed "
                                    "metrics file?") from None
    return records


def curves(records: list[dict]) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """Return the x-axis name ("step" or "round") and the named series [(x, y)] of a run.

    Series: "loss" and "loss (window average)" per step, or "training loss" per round;
    "test loss" and "test accuracy" where the run evaluated; "local accuracy" for an
    institution's own rounds. NaN values are left out (a skipped point, not a zero).
    """
    rounds = [r for r in records if r.get("event") == "round"]
    steps = [r for r in records if r.get("event") == "step"]
    evals = [r for r in records if r.get("event") == "eval"]
    series: dict[str, list[tuple[float, float]]] = {}

    def add(name, rows, x, key):
        points = [(float(r[x]), float(r[key])) for r in rows
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            series[name] = points

    if rounds:
        add("training loss", rounds, "round", "loss")
        add("test loss", rounds, "round", "test_loss")
        add("test accuracy", rounds, "round", "accuracy")
        add("local accuracy", rounds, "round", "local_accuracy")
        return "round", series
    add("loss", steps, "step", "loss")
    add("loss (window average)", steps, "step", "loss_avg")
    add("test loss", evals, "step", "loss")
    add("test accuracy", evals, "step", "accuracy")
    return "step", series


def plot_run(run_dir: str, out: str | None = None) -> list[str]:
    """Write loss.png and accuracy.png for RUN_DIR (into OUT, default RUN_DIR), and each
    institution folder's own into that folder. Return the paths written."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"--run {run_dir!r}: no metrics.jsonl there; give the run folder "
                        "(run.out) of an mpifed train run")
    written = _plot_one(run, Path(out) if out else run, title=run.name or str(run))
    for folder in sorted(run.glob("institution-*")):
        if (folder / "metrics.jsonl").is_file():
            written += _plot_one(folder, folder, title=f"{run.name}, {folder.name}")
    if not written:
        raise UserError(f"--run {run_dir!r}: metrics.jsonl holds no step, eval or round records "
                        "yet; plot it after the run has logged a few steps")
    return written


def _plot_one(run: Path, out: Path, title: str) -> list[str]:
    """Draw one folder's figures: loss.png (every loss series) and accuracy.png (if any)."""
    from .plot import _pyplot, _save, legend_below

    axis, series = curves(read_records(run / "metrics.jsonl"))
    groups = {"loss.png": [k for k in series if "loss" in k],
              "accuracy.png": [k for k in series if "accuracy" in k]}
    written = []
    for name, keys in groups.items():
        if not keys:
            continue
        plt = _pyplot()
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for key in keys:
            xs, ys = zip(*series[key])
            style = "o-" if len(xs) < 30 else "-"
            ax.plot(xs, ys, style, markersize=3, linewidth=1, label=key)
        ax.set(xlabel=axis + "s", ylabel="accuracy" if "accuracy" in name else "loss",
               title=title)
        if name == "accuracy.png":
            ax.set_ylim(0, 1.02)
        legend_below(ax)
        written.append(_save(fig, os.fspath(out), name))
        plt.close(fig)
    return written

