"""What a rank tells its own terminal, through the standard `logging` module.

    2026-12-03 07:10:02 mpifed [rank 3] warning: run.resume = "never": moved ... to ...

Each line carries the local time and, when MPI runs more than one rank, the world rank (read
as the line is written, so importing this module never starts MPI). The level comes from
`configure(level)`: `mpifed --quiet` is "warning", `--verbose` "debug", and MPIFED_LOG_LEVEL
sets it for jobs; the default is "info".

    >>> from mpifed.log import get_logger
    >>> log = get_logger(__name__)
    >>> log.info("moved %r to %r", old, new)

Not logging, and so not in this format: the progress lines and final summary of a run
(mpifed/train/report.py), a command's result on stdout (mpifed/cli/output.py), benchmark tables,
and the one error line of a failed run (mpifed/cli/failures.py: `mpifed: error [rank N]: ...`).
Nothing here crosses institutions: what a federation relays between them carries generic codes,
never ranks (mpifed/federated/).
"""

from __future__ import annotations

import logging
import os
import sys
import time

from .errors import UserError

ROOT = "mpifed"
ENV = "MPIFED_LOG_LEVEL"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def world_rank_and_size() -> tuple[int, int]:
    """Return (rank, size) of COMM_WORLD, or (0, 1) when MPI is not initialised."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized():
        return 0, 1
    return mpi.COMM_WORLD.rank, mpi.COMM_WORLD.size


class RankFormatter(logging.Formatter):
    """`2026-12-03 07:10:02 mpifed [rank 3] warning: message`; no rank part when alone."""

    def format(self, record: logging.LogRecord) -> str:
        rank, size = world_rank_and_size()
        where = f" [rank {rank}]" if size > 1 else ""
        stamp = time.strftime(TIME_FORMAT, time.localtime(record.created))
        text = f"{stamp} {ROOT}{where} {record.levelname.lower()}: {record.getMessage()}"
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


class StderrHandler(logging.StreamHandler):
    """Write to whatever sys.stderr is when a message comes (a test's capture, a redirect)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(RankFormatter())

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler sets it; the property decides
        pass


def level_number(level: str | int | None) -> int:
    """Return the logging level that `level` names ("debug" ... "error", a number, or None:
    MPIFED_LOG_LEVEL, else "info"); raise UserError on another word."""
    if isinstance(level, int):
        return level
    where = "--quiet/--verbose"
    if level is None:
        level, where = os.environ.get(ENV) or "info", ENV
    number = LEVELS.get(level.strip().lower())
    if number is None:
        raise UserError(f"{where}: {level!r} is not a log level; use one of "
                        f"{', '.join(LEVELS)}")
    return number


def configure(level: str | int | None = None) -> logging.Logger:
    """Install one stderr handler, in this module's format, on the "mpifed" logger at `level`
    (see level_number); replace the one an earlier call installed. Return the logger."""
    logger = logging.getLogger(ROOT)
    number = level_number(level)
    for handler in [h for h in logger.handlers if isinstance(h, StderrHandler)]:
        logger.removeHandler(handler)
    logger.addHandler(StderrHandler())
    logger.setLevel(number)
    logger.propagate = False  # an application's root handler would print every line twice
    return logger


def get_logger(name: str) -> logging.Logger:
    """Return the logger for module `name`, a child of "mpifed".

    Until something configures the "mpifed" logger (`mpifed` does, from its flags; an
    application may add its own handler first), messages go to stderr at MPIFED_LOG_LEVEL or
    "info", in this module's format, so a script that calls mpifed.train sees them too.
    """
    root = logging.getLogger(ROOT)
    if not root.handlers:
        try:
            configure()
        except UserError:  # a bad MPIFED_LOG_LEVEL: `mpifed` reports it when it configures
            configure("info")
    return logging.getLogger(name if name == ROOT or name.startswith(ROOT + ".")
                             else f"{ROOT}.{name}")
