"""Launch mistakes caught before a run writes anything: a singleton world under a launcher that
started several tasks.

With the wrong srun MPI plugin (`--mpi=none` for an MPI that needs PMI-2 or PMIx), or mpi4py
built against another MPI than the launcher's, each of N processes initialises MPI alone: N
one-rank jobs that each train on all the data into the same run folder. The launcher's own
variables say how many tasks it started; MPI says how many ranks it sees. They must agree.

    PMI_SIZE              MPICH's hydra, srun --mpi=pmi2 (PMI-1/2)
    OMPI_COMM_WORLD_SIZE  Open MPI's mpirun
    PMIX_SIZE             PMIx launchers (prterun, some srun --mpi=pmix)
    SLURM_STEP_NUM_TASKS  srun's task count for this step (SLURM_NTASKS where it is absent:
                          the batch script's own count, for `mpifed train` run without srun)

The launcher variables are read first: `mpiexec -n 1` inside a 4-task allocation says PMI_SIZE=1
and is what the user asked for; SLURM's count decides only where no launcher variable is set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..errors import UserError

LAUNCHER_SIZES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
SLURM_SIZES = ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
# Where each launcher says which task this process is (the one that prints the message).
TASK_RANKS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")


def launched_tasks(env: Mapping[str, str]) -> tuple[int, str] | None:
    """Return (tasks, the variable that says so) that the launcher started, or None where no
    variable names a count (a plain `python -m mpifed`). Unparsable values are skipped."""
    found = [(n, name) for name in LAUNCHER_SIZES if (n := _count(env.get(name))) is not None]
    if found:
        return max(found)
    for name in SLURM_SIZES:  # the step's own count before the job's
        if (n := _count(env.get(name))) is not None:
            return n, name
    return None


def task_rank(env: Mapping[str, str]) -> int:
    """Return this process's task number as the launcher gave it (0 where none says)."""
    for name in TASK_RANKS:
        value = _count(env.get(name))
        if value is not None:
            return value
    return 0


def mismatch_message(tasks: int, variable: str, world_size: int) -> str:
    """Return the message for `tasks` launched (per `variable`) but a world of `world_size`."""
    return (f"the launcher started {tasks} tasks ({variable}={tasks}) but MPI sees "
            f"{world_size} rank: each task would train alone on all the data into the same "
            "run folder, so nothing was started or written. Likely causes: srun's MPI plugin "
            "does not match this MPI (`srun --mpi=list` shows the plugins; PyPI's MPICH needs "
            "--mpi=pmi2, Open MPI 5 --mpi=pmix; set MPIFED_SRUN_MPI for jobs/train.sbatch), or "
            "mpi4py was built against another MPI than the launcher's (compare `mpifed info`'s "
            "MPI library with `mpiexec --version`, and rebuild mpi4py against the site's MPI). "
            "To run one rank on purpose inside a larger allocation, use `srun -n 1`")


def check_launch(world_size: int, env: Mapping[str, str] | None = None) -> None:
    """Refuse a one-rank COMM_WORLD (`world_size`) when the launcher started several tasks
    (see the module doc). The world, not the run's communicator: a run on a one-rank
    sub-communicator of a larger world is no mistake.

    Local, no communication: with one rank there is no one to agree with. Only the launcher's
    task 0 prints the message; the others end with the same exit code in silence
    (`UserError.quiet`), so N mislaunched tasks print it once.
    """
    env = os.environ if env is None else env
    if world_size != 1:
        return
    found = launched_tasks(env)
    if found is None or found[0] <= 1:
        return
    err = UserError(mismatch_message(found[0], found[1], world_size))
    err.quiet = task_rank(env) > 0
    raise err


def _count(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
