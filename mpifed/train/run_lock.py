"""The run folder's lock: OUT/run.lock, held with flock by rank 0 for the run's lifetime.

Two jobs writing one run folder (a job resubmitted while the first still runs, or N one-rank
jobs from a launch mistake) would interleave checkpoints and metrics. The first run to write
the folder holds an exclusive flock on OUT/run.lock until it ends; a second is refused, the
holder named (host, pid, SLURM job, start time, as the holder wrote them into the file).

The kernel drops a flock when its process dies, so a killed run never leaves the folder locked:
the file may stay behind, but the next run takes the lock and rewrites it. A run that ends
removes the file. A file system without flock (some Lustre and NFS mounts) runs unlocked, with
a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from ..errors import UserError
from ..log import get_logger

log = get_logger(__name__)

LOCK_NAME = "run.lock"


class RunLock:
    """The lock of one run folder, taken on rank 0 by `take` and dropped by `release`
    (a context manager: the run's lifetime)."""

    def __init__(self):
        self.fd: int | None = None
        self.path: str | None = None

    def take(self, out: str) -> None:
        """Lock `out` (created if missing) for this process; raise UserError naming the holder
        when another process holds it. Call on one rank only (rank 0), inside raise_together."""
        path = os.path.join(out, LOCK_NAME)
        if self.path == path:
            return
        os.makedirs(out, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UserError(refusal(out, holder)) from None
            except OSError as err:
                os.close(fd)
                if err.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    log.warning("run.out: %r: this file system cannot lock (%s); a second job "
                                "writing the same folder will not be refused", out, err.strerror)
                    return
                raise
            if _same_file(fd, path):  # not unlinked by a holder that ended meanwhile
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(holder_fields()) + "\n").encode())
        self.fd, self.path = fd, path

    def release(self) -> None:
        """Remove the lock file and drop the lock (local; safe to call twice)."""
        if self.fd is None:
            return
        try:
            if _same_file(self.fd, self.path):
                os.unlink(self.path)  # before unlocking: no one can lock a file about to go
        except OSError:
            pass
        os.close(self.fd)  # drops the flock
        self.fd = self.path = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def holder_fields() -> dict:
    """Return what the holder writes into the lock file: host, pid, job (SLURM_JOB_ID or
    None), started (ISO time)."""
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "job": os.environ.get("SLURM_JOB_ID"),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def refusal(out: str, holder: dict) -> str:
    """Return the message refusing a second run on `out`, naming `holder`."""
    who = [f"host {holder.get('host', '?')}", f"pid {holder.get('pid', '?')}"]
    if holder.get("job"):
        who.append(f"SLURM job {holder['job']}")
    if holder.get("started"):
        who.append(f"started {holder['started']}")
    return (f"run.out: {out!r} is in use by another run ({', '.join(who)}; it holds "
            f"{os.path.join(out, LOCK_NAME)!r}); wait for that run to end, or give this run "
            "another run.out")


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: str) -> bool:
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)
