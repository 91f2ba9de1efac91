"""A launcher that fails is reported with its own words, never as a Python exception name."""

from __future__ import annotations

import stat
import subprocess
import sys

import pytest
from helpers import run_cli

from mpifed.errors import UserError
from mpifed.launch import failure_message, launcher_family, oversubscribe_args, run

SLOTS = ("There are not enough slots available in the system to satisfy the 4\n"
         "slots that were requested by the application:\n")


def fake_launcher(folder, text: str, code: int):
    """Write an executable that prints `text` on stderr and exits `code`; return its path."""
    path = folder / "mpiexec"
    path.write_text(f"#!{sys.executable}\nimport sys\nsys.stderr.write({text!r})\n"
                    f"sys.exit({code})\n")
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def test_run_raises_user_error_with_the_stderr_tail(tmp_path):
    launcher = fake_launcher(tmp_path, "".join(f"line {i}\n" for i in range(30)) + SLOTS, 7)
    with pytest.raises(UserError) as info:
        run([str(launcher), "-n", "4", "python"])
    message = str(info.value)
    assert "exit status 7" in message and "not enough slots available" in message
    assert "line 29" in message and "line 5\n" not in message  # the tail, not everything
    assert "--ranks" in message  # the fix for too few slots
    with pytest.raises(UserError, match="exit status 7"):
        run([str(launcher)], capture_output=True, text=True, check=True)


def test_root_refusal_names_the_variables():
    message = failure_message(["mpirun", "-n", "2"], 1, [
        "mpirun has detected an attempt to run as root.", "--allow-run-as-root"])
    assert "OMPI_ALLOW_RUN_AS_ROOT=1" in message


def test_demo_reports_the_launcher_message_not_an_exception(tmp_path):
    launcher = fake_launcher(tmp_path, SLOTS, 1)
    done = run_cli(["demo", "--out", str(tmp_path / "out")], cwd=tmp_path,
                   env={"MPIFED_MPIEXEC": str(launcher)})
    assert done.returncode != 0
    assert "not enough slots available" in done.stderr.split("mpifed: error")[-1]
    assert "CalledProcessError" not in done.stderr and "Traceback" not in done.stderr


def test_open_mpi_is_told_to_oversubscribe(tmp_path):
    fake = tmp_path / "mpirun"
    fake.write_text(f"#!{sys.executable}\nprint('mpirun (Open MPI) 4.1.4')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert launcher_family(str(fake)) == ("openmpi", (4, 1))
    assert oversubscribe_args(str(fake)) == ["--oversubscribe"]
    fake.write_text(f"#!{sys.executable}\nprint('mpirun (Open MPI) 5.0.3')\n")
    launcher_family.cache_clear()
    assert oversubscribe_args(str(fake)) == ["--map-by", ":OVERSUBSCRIBE"]
    hydra = tmp_path / "hydra"
    hydra.write_text(f"#!{sys.executable}\nprint('HYDRA build details:')\n")
    hydra.chmod(hydra.stat().st_mode | stat.S_IEXEC)
    assert oversubscribe_args(str(hydra)) == []
    launcher_family.cache_clear()


def test_run_passes_pythons_environment_not_the_c_one(monkeypatch):
    """Open MPI's singleton start puts PMIX_/OMPI_ variables into the C environment only (not
    os.environ), and an mpirun that inherits them exits 1 silently: launched commands get
    Python's copy. Here a variable is set in the C environment alone, as MPI would, with
    setenv; the child must not see it, while one set through os.environ reaches it."""
    import ctypes
    import os

    libc = ctypes.CDLL(None)
    libc.setenv(b"MPIFED_TEST_C_ONLY", b"leaked", 1)
    monkeypatch.setenv("MPIFED_TEST_PY", "seen")
    try:
        show = ("import os; print(os.environ.get('MPIFED_TEST_C_ONLY'), "
                "os.environ.get('MPIFED_TEST_PY'))")
        inherited = subprocess.run([sys.executable, "-c", show], capture_output=True, text=True)
        assert inherited.stdout.split() == ["leaked", "seen"]  # the C environment has it
        done = run([sys.executable, "-c", show], capture_output=True, text=True)
        assert done.stdout.split() == ["None", "seen"]
        done = run([sys.executable, "-c", show], capture_output=True, text=True, env=None)
        assert done.stdout.split() == ["None", "seen"]  # env=None: the same copy
    finally:
        libc.unsetenv(b"MPIFED_TEST_C_ONLY")
    assert "MPIFED_TEST_C_ONLY" not in os.environ
