"""`mpifed plot --run`: the curves read from metrics.jsonl, and where each figure is written."""

import json

import pytest

from mpifed.cli.run_plot import curves, plot_run, read_records
from mpifed.errors import UserError


def write(path, records, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


STEPS = [{"event": "step", "step": 10, "loss": 2.0, "loss_avg": 2.5},
         {"event": "step", "step": 20, "loss": float("nan"), "loss_avg": 1.5},
         {"event": "eval", "step": 20, "loss": 1.2, "accuracy": 0.6},
         {"event": "summary", "steps": 20, "accuracy": 0.6}]


def test_steps_give_loss_window_average_and_test_curves():
    axis, series = curves(STEPS)
    assert axis == "step"
    assert series == {"loss": [(10.0, 2.0)],  # the NaN step is left out, not drawn as 0
                      "loss (window average)": [(10.0, 2.5), (20.0, 1.5)],
                      "test loss": [(20.0, 1.2)], "test accuracy": [(20.0, 0.6)]}


def test_rounds_give_per_round_curves():
    rounds = [{"event": "round", "round": 1, "accuracy": 0.3, "test_loss": 2.0},
              {"event": "round", "round": 2, "accuracy": 0.5, "test_loss": 1.0,
               "institutions": [{"institution": 0, "loss": 9.0}]}]
    axis, series = curves(rounds)
    assert axis == "round"
    assert series == {"test loss": [(1.0, 2.0), (2.0, 1.0)],
                      "test accuracy": [(1.0, 0.3), (2.0, 0.5)]}


def test_a_torn_last_line_is_skipped_and_a_bad_middle_line_refused(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write(path, STEPS, tail='{"event": "step", "st')
    assert read_records(path) == json.loads(json.dumps(STEPS))
    path.write_text('{"event": "step"}\nnot json\n{"event": "step"}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        read_records(path)


def test_institution_figures_stay_in_their_folders(tmp_path):
    """Under privacy the root's figure has no institution's loss; each institution folder gets
    its own figures, written there."""
    pytest.importorskip("matplotlib")
    write(tmp_path / "metrics.jsonl", [{"event": "round", "round": r, "accuracy": 0.1 * r}
                                       for r in (1, 2, 3)])
    for k in (0, 1):
        write(tmp_path / f"institution-{k}" / "metrics.jsonl",
              [{"event": "round", "round": r, "loss": 1.0 / r, "local_accuracy": 0.2 * r + k / 10}
               for r in (1, 2, 3)])
    written = plot_run(str(tmp_path), str(tmp_path / "figs"))
    assert sorted(p.relative_to(tmp_path).as_posix() for p in map(type(tmp_path), written)) == [
        "figs/accuracy.png", "institution-0/accuracy.png", "institution-0/loss.png",
        "institution-1/accuracy.png", "institution-1/loss.png"]


def test_a_folder_without_metrics_is_named(tmp_path):
    with pytest.raises(UserError, match="no metrics.jsonl there"):
        plot_run(str(tmp_path))
    write(tmp_path / "metrics.jsonl", [{"event": "summary", "steps": 0}])
    with pytest.raises(UserError, match="no step, eval or round records"):
        plot_run(str(tmp_path))
