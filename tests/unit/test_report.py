"""What rank 0 prints: plain lines in pipes, a tqdm bar on request, nothing elsewhere."""

import json

import pytest

from mpifed.train.report import Reporter


def run_steps(tmp_path, mode, active=True, total=4, first=0, log_every=2):
    reporter = Reporter(str(tmp_path), active, total, mode, append=first > 0)
    for step in range(first + 1, total + 1):
        reporter.step(step, 0, 1.0 / step, 0.1, 1000.0, 0.25, log=step % log_every == 0)
        if step == first + 1:
            reporter.line("a line while running")
    reporter.line("done")
    reporter.close()


def test_lines_mode_prints_the_logged_steps(tmp_path, capsys):
    run_steps(tmp_path, "lines")
    assert capsys.readouterr().out.splitlines() == [
        "a line while running",
        "step 2/4 epoch 0 loss 0.5000 lr 0.1 1,000 samples/s comm 25%",
        "step 4/4 epoch 0 loss 0.2500 lr 0.1 1,000 samples/s comm 25%",
        "done"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["step"] for r in records] == [2, 4]


def test_bar_mode_draws_tqdm_and_ends_at_the_last_step(tmp_path, capsys):
    run_steps(tmp_path, "bar", total=5, first=2)  # resumed after step 2
    out = capsys.readouterr().out
    last = out.split("\r")[-1].splitlines()
    assert "100%" in out and "step 5/5" in out and "loss 0.2000" in out
    assert "a line while running" in out and last[-1] == "done"


@pytest.mark.parametrize("mode,active", [("none", True), ("bar", False), ("lines", False)])
def test_silent_modes(tmp_path, capsys, mode, active):
    run_steps(tmp_path, mode, active=active)
    assert capsys.readouterr().out == ""
    assert (tmp_path / "metrics.jsonl").exists() == active


def test_auto_is_lines_in_a_pipe(tmp_path, capsys):
    assert Reporter(str(tmp_path), True, 3, "auto").mode == "lines"  # pytest captures stdout
