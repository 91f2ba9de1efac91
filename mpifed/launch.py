"""Finding and calling the MPI launcher from Python: the demo, the benchmarks and the tests.

No MPI is imported here: the processes started are the MPI programs. Two launcher families are
told apart by `mpiexec --version`: MPICH's Hydra (and the MPICH family) and Open MPI. Open MPI
refuses more ranks than cores unless told, so the commands built here pass its oversubscribe
option; a launcher that fails is reported with its own last lines of stderr (`run`).
"""

from __future__ import annotations

import collections
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from .errors import UserError

STDERR_TAIL = 12  # lines of a failed launcher's stderr repeated in the error


def mpiexec_path() -> str:
    """Return MPIFED_MPIEXEC when set, else the mpiexec beside this Python (the PyPI MPICH
    wheel's), else the one on PATH.

    The one beside the interpreter matches the mpi4py this Python imports; a site's mpiexec on
    PATH is the fallback, and a bare "mpiexec" lets the error name the missing program.
    MPIFED_MPIEXEC names another (`mpirun.openmpi` where Debian has both MPIs).
    """
    forced = os.environ.get("MPIFED_MPIEXEC")
    if forced:
        return shutil.which(forced) or forced
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else (shutil.which("mpiexec") or "mpiexec")


@functools.cache
def launcher_family(path: str | None = None) -> tuple[str, tuple[int, ...]]:
    """Return ("openmpi" | "mpich" | "unknown", version) of the launcher `path` (default
    mpiexec_path()), read once from its `--version`."""
    path = path or mpiexec_path()
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60,
                              errors="replace")
        text = done.stdout + done.stderr
    except (OSError, subprocess.SubprocessError):
        return "unknown", ()
    if "Open MPI" in text or "OpenRTE" in text:
        found = re.search(r"\)\s+(\d+)\.(\d+)", text)
        return "openmpi", tuple(map(int, found.groups())) if found else ()
    if "HYDRA" in text or "MPICH" in text:
        return "mpich", ()
    return "unknown", ()


def oversubscribe_args(path: str | None = None) -> list[str]:
    """Return the options that let the launcher start more ranks than cores.

    Open MPI refuses that by default ("not enough slots"): 4.x takes --oversubscribe, 5.x
    --map-by :OVERSUBSCRIBE. Hydra (MPICH) always allows it: nothing to add.
    """
    family, version = launcher_family(path)
    if family != "openmpi":
        return []
    return ["--map-by", ":OVERSUBSCRIBE"] if version >= (5,) else ["--oversubscribe"]


def mpiexec_command(ranks: int) -> list[str]:
    """Return the argv prefix `mpiexec -n ranks` (with Open MPI's oversubscribe option): the
    demo and the benchmarks start a few ranks on one machine, whatever its core count."""
    path = mpiexec_path()
    return [path, "-n", str(ranks), *oversubscribe_args(path)]


def mpifed_command(ranks: int | None = None) -> list[str]:
    """Return the argv prefix that runs `python -m mpifed`, under mpiexec -n `ranks` if given."""
    mpifed = [sys.executable, "-m", "mpifed"]
    return mpifed if ranks is None else [*mpiexec_command(ranks), *mpifed]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Run `cmd` (a launcher or mpifed command) like subprocess.run; raise UserError if it fails.

    The error repeats the last STDERR_TAIL lines of the command's stderr (the launcher's own
    message: "not enough slots", "run as root", the rank's error), never an exception name.
    Without capture_output, stderr still reaches the terminal as it comes.
    """
    kwargs.pop("check", None)  # failures raise UserError, not CalledProcessError
    # Python's own copy of the environment, not the C one: a process where MPI started alone
    # (Open MPI's singleton) has PMIX_*/OMPI_* variables put into its C environment, and a
    # child mpirun that inherits them exits 1 without a word (it takes itself for a nested job).
    if kwargs.get("env") is None:
        kwargs["env"] = dict(os.environ)
    if kwargs.get("capture_output") or "stderr" in kwargs:
        done = subprocess.run(cmd, **kwargs)
        err = done.stderr if isinstance(done.stderr, str) else (done.stderr or b"").decode(
            errors="replace")
        tail = err.splitlines()[-STDERR_TAIL:]
    else:
        done, tail = _run_teeing_stderr(cmd, **kwargs)
    if done.returncode != 0:
        raise UserError(failure_message(cmd, done.returncode, tail))
    return done


def _run_teeing_stderr(cmd: list[str], **kwargs):
    """Run `cmd`, copying its stderr to ours line by line; return (result, last lines)."""
    tail = collections.deque(maxlen=STDERR_TAIL)
    with subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, errors="replace",
                          **kwargs) as proc:
        for line in proc.stderr:
            sys.stderr.write(line)
            tail.append(line.rstrip("\n"))
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode), list(tail)


def failure_message(cmd: list[str], code: int, tail: list[str]) -> str:
    """Return the one message for a launched command that exited with `code`."""
    shown = " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else "")
    lines = [line for line in tail if line.strip() and not set(line.strip()) <= set("-=*")]
    said = ("; it said:\n  " + "\n  ".join(lines)) if lines else " (nothing on stderr)"
    hint = ""
    text = "\n".join(lines)
    if "allow-run-as-root" in text or "as root" in text:
        hint = ("\nOpen MPI refuses to run as root: run as a user, or set "
                "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1")
    elif "slots" in text:
        hint = "\nstart fewer ranks (--ranks), or set OMPI_MCA_rmaps_base_oversubscribe=1"
    return f"`{shown}` failed with exit status {code}{said}{hint}"



def emulated_nodes_env(nodes: int, block: bool = True,
                       ranks: int | None = None) -> dict[str, str]:
    """Return the variables that split one host's `ranks` ranks into `nodes` nodes.

    MPICH: MPI itself then sees `nodes` nodes (MPIR_CVAR_NUM_CLIQUES; MPI_COMM_TYPE_SHARED
    follows the split): shared memory inside a node, libfabric's TCP provider over the loopback
    interface between nodes (FI_TCP_IFACE=lo: without it the provider picks the machine's
    external interface). block: consecutive ranks share a node (else round-robin).
    Open MPI has no such emulation: there mpifed's own topology is split instead
    (MPIFED_RANKS_PER_NODE, blocks of ranks/nodes; `ranks` needed), and MPI still moves
    every message through shared memory. With nodes == 1, nothing is changed.
    """
    if nodes <= 1:
        return {}
    if launcher_family()[0] == "openmpi":
        if ranks is None or not block or ranks % nodes:
            raise UserError(f"{nodes} emulated nodes under Open MPI: only blocks of equal size "
                            "are emulated (MPIFED_RANKS_PER_NODE), and MPI sees one node; "
                            "MPICH's clique emulation (MPIR_CVAR_NUM_CLIQUES, TCP between "
                            "nodes) needs MPICH's mpiexec (pip install mpich)")
        return {"MPIFED_RANKS_PER_NODE": str(ranks // nodes)}
    return {"MPIR_CVAR_NUM_CLIQUES": str(nodes), "MPIR_CVAR_CLIQUES_BY_BLOCK": str(int(block)),
            "MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": "lo"}
