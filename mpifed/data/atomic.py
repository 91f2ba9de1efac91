"""Writing files so that a crash never leaves a half-written one under the final name."""

from __future__ import annotations

import contextlib
import errno
import os

from ..errors import UserError


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary name beside `path`; on success fsync it and rename it over `path`.

    On an exception the temporary is removed and `path` is left as it was.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}")
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
            full = UserError(f"no space left on device writing {path!r}; free space there "
                             f"(or choose another folder) and run again; {path!r} was left as "
                             "it was")
            full.collective = False  # often one rank alone writes: the others must end too
            raise full from None
        raise
