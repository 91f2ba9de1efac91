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



def emulated_nodes_env(nodes: int, block: bool = True) -> dict[str, str]:
    """Return the MPICH variables that split one host's ranks into `nodes` nodes, TCP between.

    MPI itself then sees `nodes` nodes (MPI_COMM_TYPE_SHARED follows the split): shared memory
    inside a node, libfabric's TCP provider over the loopback interface between nodes (FI_TCP_IFACE
    =lo: without it the provider picks the machine's external interface). block: consecutive
    ranks share a node (else round-robin). With nodes == 1, nothing is changed.
    """
    if nodes <= 1:
        return {}
    return {"MPIR_CVAR_NUM_CLIQUES": str(nodes), "MPIR_CVAR_CLIQUES_BY_BLOCK": str(int(block)),
            "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo"}
