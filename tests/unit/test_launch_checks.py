"""Launch mistakes caught before a run writes anything: the launcher's task count against a
one-rank world (mpifed/train/launch_check.py), and the run folder's flock
(mpifed/train/run_lock.py), taken here by two holders in one process (flock locks conflict
between open files, even of one process)."""

from __future__ import annotations

import json
import os
import socket

import pytest

from mpifed.errors import UserError
from mpifed.train.launch_check import check_launch, launched_tasks, task_rank
from mpifed.train.run_lock import LOCK_NAME, RunLock


@pytest.mark.parametrize("name", ["SLURM_NTASKS", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE",
                                  "PMIX_SIZE", "SLURM_STEP_NUM_TASKS"])
def test_several_tasks_and_one_rank_are_refused_naming_the_cause(name):
    with pytest.raises(UserError) as caught:
        check_launch(1, {name: "4"})
    text = str(caught.value)
    assert f"4 tasks ({name}=4) but MPI sees 1 rank" in text
    assert "srun --mpi=list" in text and "mpi4py was built against another MPI" in text
    assert not caught.value.quiet  # no task number: this process prints


def test_only_task_0_prints():
    for rank_variable in ("PMI_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        with pytest.raises(UserError) as caught:
            check_launch(1, {"SLURM_NTASKS": "3", rank_variable: "2"})
        assert caught.value.quiet
    with pytest.raises(UserError) as caught:
        check_launch(1, {"SLURM_NTASKS": "3", "SLURM_PROCID": "0"})
    assert not caught.value.quiet


@pytest.mark.parametrize("env", [{}, {"SLURM_NTASKS": "1"}, {"PMI_SIZE": "1"},
                                 {"PMI_SIZE": "1", "SLURM_NTASKS": "4"},  # mpiexec -n 1 in -n 4
                                 {"SLURM_NTASKS": "4", "SLURM_STEP_NUM_TASKS": "1"},  # srun -n 1
                                 {"PMI_SIZE": "x"}])
def test_agreeing_or_silent_launchers_pass(env):
    check_launch(1, env)


def test_a_larger_world_is_never_checked():
    check_launch(2, {"SLURM_NTASKS": "8"})  # mpiexec -n 2 inside an 8-task allocation


def test_the_launchers_own_count_comes_before_slurms():
    assert launched_tasks({"PMI_SIZE": "2", "SLURM_NTASKS": "8"}) == (2, "PMI_SIZE")
    assert launched_tasks({"SLURM_NTASKS": "8"}) == (8, "SLURM_NTASKS")
    assert launched_tasks({"SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "2"}) == (
        2, "SLURM_STEP_NUM_TASKS")  # srun's step inside the job
    assert launched_tasks({}) is None and task_rank({}) == 0


def test_a_second_holder_is_refused_naming_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    out = str(tmp_path / "out")
    with RunLock() as first:
        first.take(out)
        holder = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert holder["pid"] == os.getpid() and holder["job"] == "4242"
        with pytest.raises(UserError) as caught:
            RunLock().take(out)
        text = str(caught.value)
        assert text.startswith(f"run.out: {out!r} is in use by another run (host "
                               f"{socket.gethostname()}, pid {os.getpid()}, SLURM job 4242")
        assert "give this run another run.out" in text and f"started {holder['started']}" in text
        first.take(out)  # the holder itself may ask again
    assert not (tmp_path / "out" / LOCK_NAME).exists()  # released: the file is gone
    with RunLock() as again:  # the same folder, reused after the first run ended (resume)
        again.take(out)


def test_a_lock_file_left_by_a_killed_run_does_not_block(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text('{"host": "gone", "pid": 1}\n')  # no process holds it
    with RunLock() as lock:
        lock.take(str(out))
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()


def test_a_file_system_without_flock_runs_unlocked_with_a_warning(tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with RunLock() as lock:
        lock.take(str(tmp_path / "out"))  # no error: the run goes on
        assert lock.fd is None
    assert "this file system cannot lock" in caplog.text
