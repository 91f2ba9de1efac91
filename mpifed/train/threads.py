"""How many BLAS/OpenMP threads a rank runs, and why: one pure decision on the environment.

In order, the first that applies decides:

    MPIFED_BLAS_THREADS=k      k threads (benchmarks pin one per rank)
    OMP_NUM_THREADS, OPENBLAS_NUM_THREADS, MKL_NUM_THREADS
                               set by the user: respected. mpifed sets no limit; each library
                               reads its own variable as it always does (OpenBLAS and MKL their
                               own first, then OMP_NUM_THREADS). The count reported is the BLAS
                               one: OPENBLAS_NUM_THREADS or MKL_NUM_THREADS, else OMP_NUM_THREADS
    SLURM_CPUS_PER_TASK=c      under SLURM, c is this rank's own CPUs (srun gives each task c):
                               c threads, never divided again by the ranks on the node (at most
                               the cores this process may run on)
    otherwise                  the cores this process may run on, shared by the ranks on its node
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import UserError

USER_VARIABLES = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


@dataclass(frozen=True)
class ThreadChoice:
    """threads: BLAS threads on this rank; reason: why (for `mpifed info` and the debug log);
    limit: whether mpifed sets the thread pools to `threads` (False: the user's variables
    decide, and mpifed leaves the pools alone)."""

    threads: int
    reason: str
    limit: bool = True


def choose_threads(env: Mapping[str, str], cores: int, ranks_here: int) -> ThreadChoice:
    """Return this rank's thread count from the environment `env`, the `cores` this process
    may run on (its affinity mask) and the ranks on its node `ranks_here` (see the module doc).
    Raises UserError naming a variable whose value is no positive whole number."""
    forced = _positive(env, "MPIFED_BLAS_THREADS")
    if forced is not None:
        return ThreadChoice(forced, f"MPIFED_BLAS_THREADS={forced}")
    user = {name: n for name in USER_VARIABLES if (n := _positive(env, name)) is not None}
    if user:
        name, threads = next(iter(user.items()))  # the BLAS library's own variable first
        told = ", ".join(f"{k}={env[k]}" for k in USER_VARIABLES if k in user)
        return ThreadChoice(threads, f"{told}, set by the user, left as set", limit=False)
    per_task = _positive(env, "SLURM_CPUS_PER_TASK")
    if per_task is not None:
        threads = max(1, min(per_task, cores))
        capped = f", capped at the {cores} cores this rank may use" if threads < per_task else ""
        return ThreadChoice(threads, f"SLURM_CPUS_PER_TASK={per_task}: this rank's own "
                            f"CPUs{capped}")
    return ThreadChoice(max(1, cores // max(1, ranks_here)),
                        f"{cores} cores shared by {ranks_here} rank(s) on this node")


def _positive(env: Mapping[str, str], name: str) -> int | None:
    """Return the positive int `env[name]` says (OpenMP's "4,2" nesting list: its first level),
    None where it is unset or empty; raise UserError on anything else."""
    text = (env.get(name) or "").strip()
    if not text:
        return None
    first = text.split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        raise UserError(f"{name}={text!r}: a thread count must be a whole number of at least "
                        f"1; set {name} to one (e.g. {name}=1) or unset it")
    return int(first)
