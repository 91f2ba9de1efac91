"""Emulated nodes joined by a slow link: a command run in a network namespace of its own, whose
loopback interface is rate-limited by Linux traffic control (a token bucket, `tbf`).

    python -m mpifed.shaped_link --rate 1gbit --nodes 2 -- mpiexec -n 2 python -m mpifed train r.toml

How: `unshare -n` starts the command in a new network namespace, which holds only a loopback
interface (down); `ip link set lo up` brings it up and `tc qdisc add dev lo root tbf rate R burst
B latency L` shapes it; then the command runs there. `--nodes N` adds the MPICH variables that
split the ranks into N nodes with TCP over loopback between them (launch.emulated_nodes_env).

What it models: every byte sent over loopback inside the namespace passes one token bucket of
rate R: the TCP between emulated nodes (libfabric's tcp provider on `lo`) and the launcher's own
control connections (hydra's, a few bytes). Shared memory inside a node (MPICH's, and the
hierarchical all-reduce's windows) never touches it: fast inside a node, slow between nodes.
Both directions and every pair of nodes share the one rate, as nodes behind one half-duplex
link: two nodes sending to each other at once get R/2 each. netem (delay, loss) is not
available here; tbf's `latency` only bounds its queue (how long a packet may wait for tokens).

Needs Linux, root (a network namespace and its qdisc), `unshare` (util-linux), `ip` and `tc`
(iproute2) and the kernel's sch_tbf; `shaping_problem()` says which is missing.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys

from .errors import UserError
from .launch import emulated_nodes_env

RATE, BURST, LATENCY = "1gbit", "256kb", "50ms"  # tbf's rate, bucket size, queue bound
TOOLS = {"unshare": "util-linux", "ip": "iproute2", "tc": "iproute2"}
# tc's spellings: a number and a unit (rate: bit/s or bytes/s; burst: bytes; latency: time)
UNITS = {"rate": r"(bit|[kmgt]bit|bps|[kmgt]bps|[kmgt]ibit|[kmgt]ibps)",
         "burst": r"(b|kb|mb|gb|k|m|g)?", "latency": r"(s|ms|us)"}
# Run by `sh -c` in the new namespace: $1 rate, $2 burst, $3 latency, then the command.
# MPIFED_SHAPED_LINK tells the command which link it runs over: the measured "auto" keys its
# cache by it (mpifed/train/allreduce_choice.py), so a table timed over plain loopback is never
# followed over the slow link, nor the other way round.
SETUP = ('ip link set lo up && tc qdisc add dev lo root tbf rate "$1" burst "$2" latency "$3" '
         '|| { echo "shaped link: could not shape the loopback interface (rate $1, burst $2, '
         'latency $3); see the line above" >&2; exit 97; }; '
         'export MPIFED_SHAPED_LINK="tbf rate $1 burst $2 latency $3"; shift 3; exec "$@"')
SETUP_FAILED = 97  # the exit status when the namespace or its qdisc could not be set up


def shaping_problem() -> str | None:
    """Say why a shaped link cannot run here (not Linux, not root, a tool missing), or None."""
    if not sys.platform.startswith("linux"):
        return f"a shaped link needs Linux network namespaces; this is {sys.platform}"
    if os.geteuid() != 0:
        return ("a shaped link needs root (a network namespace of its own and a qdisc on its "
                "loopback interface); run as root, e.g. in a container you own")
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        packages = " ".join(sorted({TOOLS[tool] for tool in missing}))
        return f"a shaped link needs {', '.join(missing)}, not found on PATH: install them " \
               f"(apt-get install {packages})"
    return None


def check_value(what: str, value: str) -> str:
    """Return `value` if tc reads it as a `what` (rate, burst, latency); else ValueError."""
    if not re.fullmatch(r"\d+(\.\d+)?" + UNITS[what], value.strip().lower()):
        examples = {"rate": "1gbit, 100mbit, 10gbit", "burst": "256kb, 1mb",
                    "latency": "50ms"}[what]
        raise ValueError(f"shaped link: --{what} {value!r} is not a tc {what}; write a number "
                         f"and a unit, e.g. {examples}")
    return value.strip().lower()


def shaped_command(argv: list[str], rate: str = RATE, burst: str = BURST,
                   latency: str = LATENCY) -> list[str]:
    """Return the argv that runs `argv` in a new network namespace with its loopback interface
    shaped to `rate` (tc units: "1gbit"); the command's own exit status comes back, or
    SETUP_FAILED with a message when the namespace could not be set up."""
    values = [check_value(w, v) for w, v in (("rate", rate), ("burst", burst),
                                             ("latency", latency))]
    return ["unshare", "--net", "sh", "-c", SETUP, "shaped-link", *values, *argv]


def probe(rate: str = RATE) -> str | None:
    """Say why shaping fails on this machine (shaping_problem, or the kernel refusing the
    namespace or tbf: a container without the capability), or None. Starts one process."""
    problem = shaping_problem()
    if problem:
        return problem
    try:
        done = subprocess.run(shaped_command(["tc", "qdisc", "show", "dev", "lo"], rate),
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"a shaped link could not start: {err}"
    if done.returncode != 0 or "tbf" not in done.stdout:
        return f"a shaped link could not be set up here: {(done.stderr or done.stdout).strip()}"
    return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpifed.shaped_link", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", default=RATE, help=f"the link's rate, tc units (default {RATE})")
    parser.add_argument("--burst", default=BURST, help=f"tbf's bucket (default {BURST})")
    parser.add_argument("--latency", default=LATENCY,
                        help=f"tbf's queue bound (default {LATENCY})")
    parser.add_argument("--nodes", type=int, default=1,
                        help="emulated nodes: MPICH splits the ranks into this many, TCP over "
                             "the shaped loopback between them (default 1: no split)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- the command to run")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("name the command to run after --, e.g. -- mpiexec -n 2 python -m mpifed "
                     "train run.toml")
    problem = shaping_problem()
    try:
        if problem:
            raise ValueError(problem)
        shaped = shaped_command(command, args.rate, args.burst, args.latency)
        env = {**os.environ, **emulated_nodes_env(args.nodes)}
    except (ValueError, UserError) as err:  # UserError: --nodes under Open MPI, say
        print(f"error: {err}", file=sys.stderr)
        return 2
    return subprocess.run(shaped, env=env).returncode


if __name__ == "__main__":
    raise SystemExit(main())
