"""What comm.allreduce = "auto" reduces a step's gradients with: measured once per topology on
the run's own communicator (mpifed/comm/autotune.py), then read from a cache file.

    $XDG_CACHE_HOME/mpifed/allreduce-<sha256 of the topology key>.json   (else ~/.cache/mpifed/)

    {"format": "mpifed allreduce choice", "version": 2,
     "key": {"world_size": 4, "node_sizes": [2, 2], "transport": "netmod ofi, ...",
             "mpi_library": "MPICH Version: 5.0.2 ...", "dtype": "float32", "window": true},
     "choice": {"65536": "mpi", "1048576": "ring"},
     "seconds": {"65536": {"ring": 0.00021, "mpi": 0.00012, "hierarchical": 0.00019}, ...}}

Sizes are power-of-two buckets of bytes (autotune.bucket_bytes). Rank 0 reads the file and
broadcasts it as ints; what the file lacks is measured by every rank and merged in; rank 0
rewrites the file atomically. A corrupt file, or one whose key is not this run's, is ignored
with a warning and rewritten. MPIFED_AUTOTUNE (read on rank 0): unset or 1 measures what the
cache lacks; refresh measures everything again; 0 measures nothing (the fixed rule of
comm/collectives.py). A forced comm.allreduce measures nothing either.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np
from mpi4py import MPI

from ..choices import ALGORITHMS
from ..comm.agree import raise_together
from ..comm.autotune import Scratch, bucket_bytes, decode, encode, install, measure
from ..comm.collectives import algorithm_for
from ..comm.scalars import allreduce_int, bcast_ints
from ..comm.shared import window_of
from ..comm.topology import node_facts, transport
from ..data.atomic import atomic_path
from ..errors import UserError
from ..log import get_logger

log = get_logger(__name__)

# version 2: each call's slowest rank, more calls, close calls re-timed, fresh ordinary arrays
# (comm/autotune.py); a version-1 table is measured again
FORMAT, VERSION = "mpifed allreduce choice", 2
MODES = {"1": 1, "refresh": 2, "0": 0}  # MPIFED_AUTOTUNE -> the code broadcast from rank 0


def cache_folder() -> str:
    """Return the user's cache folder for mpifed: $XDG_CACHE_HOME/mpifed, else ~/.cache/mpifed."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "mpifed")


def topology_key(comm, dtype, window: bool) -> dict:
    """Return what a measurement depends on (collective): ranks, node sizes, how bytes move
    between nodes, the MPI library, the dtype and whether buffers are window arrays; under
    mpifed.shaped_link also the link's shaping (MPIFED_SHAPED_LINK)."""
    facts = node_facts(comm)
    key = {"world_size": comm.size, "node_sizes": facts["node_sizes"],
           "transport": transport(facts), "mpi_library": MPI.Get_library_version().strip(),
           "dtype": np.dtype(dtype).name, "window": bool(window)}
    shaped = os.environ.get("MPIFED_SHAPED_LINK")  # set by mpifed.shaped_link: a slower link
    return key | {"shaped_link": shaped} if shaped else key


def cache_path(key: dict) -> str:
    """Return the cache file for `key`: allreduce-<sha256 of its canonical JSON>.json."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return os.path.join(cache_folder(), f"allreduce-{digest}.json")


def read_cache(path: str, key: dict) -> tuple[dict[int, str], dict]:
    """Return the file's ({bucket: algorithm}, {bucket: seconds per algorithm}) for `key`;
    empty when it is missing, and empty with a warning when it is corrupt or another
    topology's (it is rewritten after measuring)."""
    try:
        with open(path) as fh:
            data = json.load(fh)
    except FileNotFoundError:
        return {}, {}
    except (OSError, ValueError) as err:
        log.warning("comm.allreduce auto: ignoring the cache %r, it cannot be read (%s); "
                    "measuring again", path, err)
        return {}, {}
    problem = cache_problem(data, key)
    if problem:
        log.warning("comm.allreduce auto: ignoring the cache %r (%s); measuring again", path,
                    problem)
        return {}, {}
    seconds = data.get("seconds")
    seconds = {int(b): s for b, s in seconds.items() if b.isdigit()} \
        if isinstance(seconds, dict) else {}
    return {int(b): a for b, a in data["choice"].items()}, seconds


def cache_problem(data, key: dict) -> str | None:
    """Say what is wrong with a parsed cache file for `key`, or None. Pure."""
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or data.get("version") != VERSION:
        return f"not a version-{VERSION} {FORMAT!r} file"
    if data.get("key") != key:
        return "it was measured on another topology"
    choice = data.get("choice")
    if not isinstance(choice, dict):
        return "no 'choice' table"
    for bucket, algorithm in choice.items():
        if not (isinstance(bucket, str) and bucket.isdigit()) or algorithm not in ALGORITHMS \
                or algorithm in ("auto", "nccl"):
            return f"a bad entry {bucket!r}: {algorithm!r}"
    return None


def write_cache(path: str, key: dict, choice: dict, seconds: dict) -> None:
    """Write the cache file atomically (rank 0); a failure is a warning, the run goes on."""
    data = {"format": FORMAT, "version": VERSION, "key": key,
            "choice": {str(b): a for b, a in sorted(choice.items())},
            "seconds": {str(b): s for b, s in sorted(seconds.items())}}
    try:
        with atomic_path(path) as tmp, open(tmp, "w") as fh:
            json.dump(data, fh, indent=1)
    except (OSError, UserError) as err:
        log.warning("comm.allreduce auto: could not write the cache %r (%s); the next run "
                    "measures again", path, err)


def autotune_mode() -> int:
    """Return MPIFED_AUTOTUNE's code (0 off, 1 measure what is missing, 2 refresh)."""
    value = os.environ.get("MPIFED_AUTOTUNE", "1").strip().lower()
    if value not in MODES:
        raise UserError(f"MPIFED_AUTOTUNE={value!r} is not known; use 1 (measure once and "
                        "cache, the default), refresh (measure again) or 0 (the fixed rule)")
    return MODES[value]


def tuned_table(comm, buckets, dtype, window: bool, *, timer=None) -> tuple[dict | None, str]:
    """Return ({bucket: algorithm} for `buckets`, where it came from), the same on every rank;
    (None, why) when MPIFED_AUTOTUNE=0. Collective over `comm`; rank 0 reads and writes the
    cache, and only what it lacks is measured.

    buckets: sizes in bytes (autotune.bucket_bytes), the same on every rank. timer:
    autotune.measure's (tests inject one).
    """
    buckets = sorted({int(b) for b in buckets})
    key = topology_key(comm, dtype, window)
    path = cache_path(key)
    cached, cached_seconds = {}, {}

    def read() -> list[int]:  # rank 0: [mode, bucket, algorithm index, ...] the cache has
        nonlocal cached, cached_seconds
        if comm.rank != 0:
            return []
        mode = autotune_mode()
        if mode == 1:
            cached, cached_seconds = read_cache(path, key)
        return [mode, *encode({b: a for b, a in cached.items() if b in buckets})]

    mode, *found = bcast_ints(comm, raise_together(comm, read))
    if mode == 0:
        return None, "MPIFED_AUTOTUNE=0, the fixed rule"
    table = decode(found)
    missing = [b for b in buckets if b not in table]
    if not missing:
        return table, f"read from the cache {path}, nothing measured"
    scratch = Scratch(comm, max(missing), dtype, window)
    measured, seconds = measure(comm, missing, scratch, **({"timer": timer} if timer else {}))
    scratch.free()
    table.update(measured)
    if comm.rank == 0:
        write_cache(path, key, cached | measured, cached_seconds | seconds)
    return table, f"measured {len(missing)} size(s), cached in {path}"


def gradient_ranges(spec, n: int, dtype, overlap: bool) -> list[tuple[int, int]]:
    """Return the element ranges of the gradient buffer (n + 2 slots: loss and stop) that a
    data-parallel step all-reduces: the whole, or with overlap each layer's (the last one
    carries the two extra slots), as DataParallelStep issues them."""
    if not overlap:
        return [(0, n + 2)]
    ranges = []
    for i in range(len(spec.layers)):
        lo, hi = spec.layer_range(i, dtype)
        if hi > lo:
            ranges.append((lo, n + 2 if hi == n else hi))
    return ranges


def choose_for_step(spec, grad, comm, algorithm: str, xp, overlap: bool) -> dict[str, str]:
    """Settle what each of the step's all-reduces runs; return {bucket bytes: algorithm} as
    strings, for the summary (collective over `comm`).

    "auto" on host arrays over several ranks: the measured table (cached per topology),
    installed on `comm` so that the step's allreduce(..., "auto") calls follow it.
    """
    n = grad.size - 2
    ranges = gradient_ranges(spec, n, grad.dtype, overlap and comm.size > 1)
    if algorithm == "auto" and xp is np and comm.size > 1:
        window = allreduce_int(comm, int(window_of(grad)[0] is not None), MPI.MIN) == 1
        buckets = [bucket_bytes((hi - lo) * grad.itemsize) for lo, hi in ranges]
        table, source = tuned_table(comm, buckets, grad.dtype, window)
        install(comm, table)
        choice = describe(comm, grad, ranges, algorithm)
        if comm.rank == 0:
            log.info("comm.allreduce auto: %s; %s", source, render(choice))
        return choice
    return describe(comm, grad, ranges, algorithm)


def describe(comm, grad, ranges, algorithm: str) -> dict[str, str]:
    """Return {bucket bytes: the algorithm the step's all-reduce of that range runs}."""
    return {str(bucket_bytes((hi - lo) * grad.itemsize)): algorithm_for(grad[lo:hi], comm,
                                                                      algorithm)
            for lo, hi in sorted(ranges, key=lambda r: r[1] - r[0])}


def render(choice: dict) -> str:
    """Return '64 KiB mpi, 1 MiB ring' for {'65536': 'mpi', '1048576': 'ring'}."""
    def size(nbytes: int) -> str:
        for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
            if nbytes >= scale:
                return f"{nbytes / scale:g} {unit}"
        return f"{nbytes} B"
    return ", ".join(f"{size(int(b))} {a}" for b, a in choice.items())
