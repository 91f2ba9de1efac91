"""Writing files so that a crash never leaves a half-written one under the final name."""

from __future__ import annotations

import contextlib
import errno
import os

from ..errors import UserError


class DiskFull(UserError):
    """No space left on the device writing `path`.

    existed: whether a file was at `path` before (it still is, untouched); earlier: where the
    earlier copy went when something moved it away first (a phrase, e.g. "the earlier run's
    model.h5 is in 'out/previous-20261203-071002'"), so the message never points at an empty
    path as if it held the old file.
    """

    collective = False  # often one rank alone writes: the others must end too

    def __init__(self, path: str, existed: bool, earlier: str | None = None):
        self.path, self.existed, self.earlier = path, existed, earlier
        if existed:
            left = f"{path!r} was left as it was"
        else:
            left = f"no file is left at {path!r}" + (f": {earlier}" if earlier else "")
        super().__init__(f"no space left on device writing {path!r}; free space there (or "
                         f"choose another folder) and run again; {left}")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside `path`; on success fsync it and rename it over `path`.

    On an exception the temporary is removed and `path` is left as it was (a file there, or
    none); a full disk raises DiskFull, which says which.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    existed = os.path.exists(path)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        if isinstance(err, OSError) and (err.errno in (errno.ENOSPC, errno.EDQUOT)
                                         or "No space left" in str(err)):
            raise DiskFull(path, existed) from None
        raise
