"""Logging: every local message carries the time, the world rank under several ranks and the
level; --quiet, --verbose and MPIFED_LOG_LEVEL choose what shows; a command's result and a run's
final line are output, shown at every level; and no `print` outside the places listed here."""

from __future__ import annotations

import ast
import logging
import os
import re
import types
from pathlib import Path

import pytest
from conftest import write_site

from mpifed.cli.main import main
from mpifed.log import ENV, RankFormatter, configure, get_logger

PACKAGE = Path(__file__).resolve().parents[2] / "mpifed"

# time, "mpifed", the world rank where there are several, the level in lower case, the message
LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) mpifed (?:\[rank (\d+)\] )?"
                  r"(debug|info|warning|error): (.*)$")

RUN = ('[data]\ntrain = "d.h5"\n[optim]\nbatch_size = 4\nsteps = 2\n'
       '[run]\nout = "out"\nprogress = "lines"\nresume = "never"\n')
FED = '[data]\ntrain = "d.h5"\n[federated]\ninstitutions = 2\nmu = 0.1\n'


@pytest.fixture
def levels(monkeypatch):
    """Let a test call main() with flags: the level and MPIFED_LOG_LEVEL come back after."""
    monkeypatch.setenv(ENV, "info")  # main() writes a flag there; this restores it
    yield
    configure("info")


def lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def fake_mpi(rank: int, size: int):
    return types.SimpleNamespace(Is_initialized=lambda: True, Is_finalized=lambda: False,
                                 COMM_WORLD=types.SimpleNamespace(rank=rank, size=size))


def record(level: int, text: str) -> logging.LogRecord:
    return logging.LogRecord("mpifed.test", level, __file__, 1, text, None, None)


def test_a_line_has_the_time_the_level_and_no_rank_alone(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "mpi4py.MPI", fake_mpi(0, 1))
    line = RankFormatter().format(record(logging.WARNING, "moved 'a' to 'b'"))
    match = LINE.match(line)
    assert match and match[2] is None and match[3] == "warning" and match[4] == "moved 'a' to 'b'"
    assert "[rank" not in line


def test_the_rank_is_read_when_the_line_is_written(monkeypatch):
    formatter = RankFormatter()
    monkeypatch.setitem(__import__("sys").modules, "mpi4py.MPI", fake_mpi(3, 4))
    assert LINE.match(formatter.format(record(logging.INFO, "x")))[2] == "3"
    monkeypatch.setitem(__import__("sys").modules, "mpi4py.MPI", fake_mpi(1, 2))
    line = formatter.format(record(logging.DEBUG, "y"))
    assert " mpifed [rank 1] debug: y" in line




def test_quiet_hides_the_info_notice_and_keeps_the_final_line(tmp_path, monkeypatch, capsys,
                                                              levels):
    monkeypatch.chdir(tmp_path)
    write_site(tmp_path / "d.h5", 40, 0)
    (tmp_path / "run.toml").write_text(RUN)
    assert main(["train", "run.toml"]) == 0
    capsys.readouterr()
    assert main(["train", "run.toml", "--quiet"]) == 0
    assert os.environ[ENV] == "warning"  # for the runs that a command launches
    out, err = capsys.readouterr()
    assert "moved the earlier run's" not in err and not lines(err), err
    assert any(line.startswith("done: 2 steps") for line in out.splitlines()), out
    monkeypatch.setenv(ENV, "info")  # --quiet went there, for the runs a command launches
    assert main(["train", "run.toml"]) == 0  # info: the notice says where
    out, err = capsys.readouterr()
    (notice,) = [m for m in lines(err) if "moved the earlier run's" in m[4]]
    assert notice[3] == "info" and re.search(r"from 'out' to 'out/previous-[\d-]+'$", notice[4])


def test_quiet_keeps_warnings(tmp_path, capsys, levels):
    (tmp_path / "fed.toml").write_text(FED)
    assert main(["-q", "config", "validate", str(tmp_path / "fed.toml")]) == 0
    out, err = capsys.readouterr()
    assert out.strip().endswith("fed.toml: valid")
    (warning,) = lines(err)
    assert warning[3] == "warning" and "federated.mu = 0.1 is ignored" in warning[4]


def test_verbose_shows_debug_and_the_default_does_not(tmp_path, capsys, levels):
    (tmp_path / "run.toml").write_text(RUN)
    assert main(["config", "validate", str(tmp_path / "run.toml")]) == 0
    assert not [m for m in lines(capsys.readouterr().err) if m[3] == "debug"]
    assert main(["config", "validate", str(tmp_path / "run.toml"), "--verbose"]) == 0
    debug = [m for m in lines(capsys.readouterr().err) if m[3] == "debug"]
    assert debug and "run.toml" in debug[0][4] and "override" in debug[0][4]


def test_get_logger_names_children_of_mpifed():
    assert get_logger("mpifed.train.setup").name == "mpifed.train.setup"
    assert get_logger("script").name == "mpifed.script"
    assert get_logger("script").parent is logging.getLogger("mpifed")


# Every place in mpifed/ that may call print, and why; everything else logs (mpifed.log).
ALLOWED_PRINTS = {
    "train/report.py": "a run's progress lines and final 'done:' line on stdout: output",
    "cli/output.py": "emit(): each command's result on stdout (info, data inspect, evaluate...)",
    "cli/failures.py": "a failed run's one line, 'mpifed: error [rank N]: ...', which scripts grep",
    "comm/stall.py": "the stall's error line, in failures.py's form, just before MPI_Abort "
                     "(comm/ does not import cli/)",
    "benchmarks/allreduce.py": "a benchmark's table on stdout",
    "benchmarks/cnn_throughput.py": "a benchmark's table and JSON rows on stdout",
    "benchmarks/federated_round.py": "a benchmark's table on stdout",
    "benchmarks/federated_goals.py": "a benchmark's tables on stdout (robust rows as they come)",
    "benchmarks/gpu_throughput.py": "a benchmark's table and JSON rows on stdout",
    "benchmarks/harness.py": "the benchmarks' shared table printer",
    "benchmarks/memory.py": "a benchmark's table, and a failed launch's stderr, on stdout",
    "benchmarks/shuffle_order.py": "a benchmark's tables on stdout (digits rows as they come)",
    "benchmarks/streaming.py": "a benchmark's table on stdout (each rank count's ratio line)",
    "benchmarks/predict.py": "the alpha-beta model's table on stdout",
    "benchmarks/scaling.py": "a scaling point's CSV row on stdout",
    "benchmarks/scaling_suite.py": "the scaling suite's table on stdout",
    "benchmarks/train_throughput.py": "a benchmark's table and JSON rows on stdout",
    "benchmarks/compression_link.py": "a benchmark's table, JSON rows and a failed launch's "
                                      "stderr on stdout; a bad --rate on stderr",
    "launch.py": "a started job's stderr passed through line by line as it comes (the demo's and "
                 "the benchmarks' ranks), its tail kept for the failure message",
    "shaped_link.py": "the shaped-link wrapper's one error line (it runs before any logging "
                      "is set up, around a foreign command)",
}


def _writes(tree) -> list[int]:
    """Return the lines of print(...) and sys.stdout/stderr.write(...) calls in `tree`."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Name) and func.id == "print":
            found.append(node.lineno)
        elif isinstance(func, ast.Attribute) and func.attr == "write" \
                and isinstance(func.value, ast.Attribute) \
                and func.value.attr in ("stdout", "stderr") \
                and isinstance(func.value.value, ast.Name) and func.value.value.id == "sys":
            found.append(node.lineno)
    return found


def test_no_print_outside_the_allowed_places():
    printing = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        calls = _writes(ast.parse(path.read_text()))
        if calls:
            printing[path.relative_to(PACKAGE).as_posix()] = calls
    unexplained = {f"mpifed/{name}:{lines}" for name, lines in printing.items()
                   if name not in ALLOWED_PRINTS}
    assert not unexplained, f"log these through mpifed.log (or emit output): {unexplained}"
    stale = set(ALLOWED_PRINTS) - set(printing)
    assert not stale, f"these print no more; drop them from ALLOWED_PRINTS: {stale}"
