"""Logging: every local message carries the time, the world rank under several ranks and the
level; --quiet, --verbose and MPIFED_LOG_LEVEL choose what shows; a command's result and a run's
final line are output, shown at every level; and no `print` outside the places listed here."""

from __future__ import annotations

import re

from helpers import run_cli, run_script

from mpifed.log import ENV

# time, "mpifed", the world rank where there are several, the level in lower case, the message
LINE = re.compile(r"^(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}) mpifed (?:\[rank (\d+)\] )?"
                  r"(debug|info|warning|error): (.*)$")

RUN = ('[data]\ntrain = "d.h5"\n[optim]\nbatch_size = 4\nsteps = 2\n'
       '[run]\nout = "out"\nprogress = "lines"\nresume = "never"\n')


def lines(text: str) -> list[re.Match]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_the_environment_sets_the_level_and_a_bad_one_is_named(tmp_path):
    (tmp_path / "run.toml").write_text(RUN)
    done = run_cli(["config", "validate", "run.toml"], cwd=tmp_path, env={ENV: "debug"})
    assert done.returncode == 0 and any(m[3] == "debug" for m in lines(done.stderr)), done.stderr
    done = run_cli(["config", "validate", "run.toml"], cwd=tmp_path, env={ENV: "loud"})
    assert done.returncode == 1
    assert done.stderr.strip() == (f"mpifed: error: {ENV}: 'loud' is not a log level; use one of "
                                   "debug, info, warning, error")

def test_every_rank_prefixes_its_lines_under_mpiexec(tmp_path):
    done = run_script(2, "from mpi4py import MPI\n"
                         "from mpifed.log import get_logger\n"
                         "get_logger('test').warning('hello from %d', MPI.COMM_WORLD.rank)\n",
                      tmp_path)
    assert done.returncode == 0, done.stderr
    found = {(m[2], m[3], m[4]) for m in lines(done.stderr)}
    assert found == {("0", "warning", "hello from 0"), ("1", "warning", "hello from 1")}, \
        done.stderr
