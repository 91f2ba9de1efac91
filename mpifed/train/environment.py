"""What a run records of where it ran: the summary's and OUT/config.toml's environment fields.

    mpifed_version   mpifed.__version__
    git_commit       the commit of the mpifed source tree when it is a git checkout, else None
    mpi_library      the first line of MPI.Get_library_version()
    world_size       the ranks of the run's communicator
    hosts            the sorted distinct host names of its ranks (left out in a federation
                     under DP or secure aggregation: which hosts an institution runs on is
                     its own fact, not the root's to record)
    config_sha256    SHA-256 of config.toml's body: the bytes after its header, which are the
                     resolved configuration as `to_toml` writes it

The same fields name the environment of every other output: an institution's own metrics and
trace (`institution_environment`, with its own hosts), the Chrome trace (its `otherData`), and
each benchmark record (`bench_environment`: config_sha256 there hashes the record's config, as
canonical JSON).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess

import numpy as np

from .. import __version__
from ..config import to_toml

# Bytes per rank of a gathered host name, and of the broadcast commit (fixed buffers, never
# pickles: the communicator may be a federation's world).
NAME_BYTES = 256
COMMIT_BYTES = 64

HEADER_TITLE = ("# mpifed run configuration. This header (the leading '#' lines, up to the "
                "first blank line)\n# records where the run ran; config_sha256 is the SHA-256 "
                "of the bytes after it.\n")


def run_environment(cfg, comm) -> dict:
    """Return the environment fields of a run of `cfg` (a Config) on `comm`, the same on every
    rank (collective)."""
    from mpi4py import MPI  # here, not at the top: benchmarks' launching parents use this module

    private = cfg.federated is not None and (cfg.federated.dp is not None
                                             or cfg.federated.secure_aggregation)
    env = {"mpifed_version": __version__,
           "git_commit": bcast_text(comm, git_commit() if comm.rank == 0 else None),
           "mpi_library": MPI.Get_library_version().splitlines()[0].strip(),
           "world_size": comm.size}
    if not private:
        env["hosts"] = gather_hosts(comm)
    env["config_sha256"] = config_sha256(to_toml(cfg))
    return env


def institution_environment(env: dict, site_comm, institution: int) -> dict:
    """Return the environment fields of institution `institution`'s own files (its metrics,
    its trace, in OUT/institution-K/): the run's `env`, with `hosts` those of its own ranks
    (`site_comm`, collective over it; never gathered across institutions), plus
    `institution` and `institution_ranks`."""
    mine = {k: v for k, v in env.items() if k != "hosts"}
    mine["hosts"] = gather_hosts(site_comm)
    mine.update(institution=institution, institution_ranks=site_comm.size)
    return mine


def bench_environment(ranks: int, config: dict, hosts: list[str], mpi_library) -> dict:
    """Return the environment fields of a benchmark record: `ranks` as world_size, the hosts
    that ran it, and config_sha256 of its `config` as canonical JSON (sorted keys). Needs no
    MPI: a benchmark's launching parent builds its records."""
    return {"mpifed_version": __version__, "git_commit": git_commit(),
            "mpi_library": mpi_library, "world_size": ranks, "hosts": sorted(set(hosts)),
            "config_sha256": config_sha256(json.dumps(config, sort_keys=True, default=str))}


def config_sha256(body: str) -> str:
    """Return the SHA-256 (hex) of config.toml's body `body` (its UTF-8 bytes)."""
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def git_commit(tree: str | None = None) -> str | None:
    """Return the HEAD commit of `tree` (default: the folder that holds the mpifed package) when
    that folder is itself a git checkout; None where it is not, or git is absent or fails."""
    tree = tree or os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(tree, ".git")):  # not a checkout: never a parent's repo
        return None
    try:
        done = subprocess.run(["git", "-C", tree, "rev-parse", "--verify", "HEAD"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = done.stdout.strip()
    return commit if done.returncode == 0 and commit else None


def bcast_text(comm, text: str | None, root: int = 0) -> str | None:
    """Return the root's short ASCII `text` (None allowed) on every rank, in a fixed buffer."""
    buf = np.zeros(COMMIT_BYTES + 1, dtype=np.uint8)
    if comm.rank == root and text is not None:
        raw = text.encode("ascii", "replace")[:COMMIT_BYTES]
        buf[0], buf[1:1 + len(raw)] = 1, np.frombuffer(raw, dtype=np.uint8)
    comm.Bcast(buf, root=root)
    return bytes(buf[1:]).rstrip(b"\0").decode("ascii") if buf[0] else None


def gather_hosts(comm) -> list[str]:
    """Return the sorted distinct host names (MPI.Get_processor_name) of `comm`'s ranks."""
    from mpi4py import MPI

    own = np.zeros(NAME_BYTES, dtype=np.uint8)
    raw = MPI.Get_processor_name().encode("utf-8", "replace")[:NAME_BYTES]
    own[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    every = np.empty((comm.size, NAME_BYTES), dtype=np.uint8)
    comm.Allgather(own, every)
    names = {bytes(row).rstrip(b"\0").decode("utf-8", "replace") for row in every}
    return sorted(names)


def config_header(env: dict) -> str:
    """Return OUT/config.toml's header: TOML comments `# key = value` (JSON values; a None
    left out), ended by a blank line."""
    lines = [f"# {key} = {json.dumps(value)}" for key, value in env.items() if value is not None]
    return HEADER_TITLE + "\n".join(lines) + "\n\n"


def split_header(text: str) -> tuple[dict, str]:
    """Return (the header's fields, the body) of config.toml's `text`: the header is the
    leading '#' lines and the one blank line after them."""
    lines = text.split("\n")
    n = 0
    while n < len(lines) and lines[n].startswith("#"):
        n += 1
    fields = {}
    for line in lines[:n]:
        key, sep, value = line[2:].partition(" = ")
        if sep and key.isidentifier():
            fields[key] = json.loads(value)
    if n and n < len(lines) and lines[n] == "":
        n += 1
    return fields, "\n".join(lines[n:])
