"""Finding and calling the MPI launcher from Python: the demo, the benchmarks and the tests.

No MPI is imported here: the processes started are the MPI programs.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def mpiexec_path() -> str:
    """Return the mpiexec beside this Python (the PyPI MPICH wheel's), else the one on PATH.

    The one beside the interpreter matches the mpi4py this Python imports; a site's mpiexec on
    PATH is the fallback, and a bare "mpiexec" lets the error name the missing program.
    """
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


def mpifed_command(ranks: int | None = None) -> list[str]:
    """Return the argv prefix that runs `python -m mpifed`, under mpiexec -n `ranks` if given."""
    mpifed = [sys.executable, "-m", "mpifed"]
    return mpifed if ranks is None else [mpiexec_path(), "-n", str(ranks), *mpifed]

