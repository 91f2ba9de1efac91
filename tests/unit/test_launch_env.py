"""Commands mpifed starts (launch.run: `mpifed demo`, the benchmarks, demo-gpt) get Python's
copy of the environment, not the C one. A process in which Open MPI started alone (a
singleton: `from mpi4py import MPI` without mpirun) has PMIX_*/OMPI_* variables put into its C
environment; an mpirun that inherits them exits 1 without a word (CI's demo-gpt test under Open
MPI, after another test had started MPI in the pytest process). os.putenv stands in for that
here: it changes the C environment and not os.environ."""

from __future__ import annotations

import os

import pytest

from mpifed import launch
from mpifed.errors import UserError


@pytest.fixture
def c_only_variable():
    name = "MPIFED_TEST_C_ONLY"
    os.putenv(name, "inherited")
    yield name
    os.unsetenv(name)


def test_a_variable_only_in_the_c_environment_does_not_reach_the_command(c_only_variable):
    done = launch.run(["sh", "-c", f"echo ${{{c_only_variable}-absent}}"], capture_output=True,
                      text=True)
    assert done.stdout.strip() == "absent"


def test_os_environ_reaches_it_and_a_given_env_wins(monkeypatch):
    monkeypatch.setenv("MPIFED_TEST_PY", "seen")
    done = launch.run(["sh", "-c", "echo $MPIFED_TEST_PY"], capture_output=True, text=True)
    assert done.stdout.strip() == "seen"
    done = launch.run(["sh", "-c", "echo ${MPIFED_TEST_PY-absent}"], capture_output=True,
                      text=True, env={"PATH": os.environ["PATH"]})
    assert done.stdout.strip() == "absent"


def test_a_failure_is_one_user_error_naming_the_command():
    with pytest.raises(UserError, match="exit status 3"):
        launch.run(["sh", "-c", "echo nope >&2; exit 3"], capture_output=True, text=True)
