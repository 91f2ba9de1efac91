"""A command's result on stdout: what `mpifed info`, `mpifed data inspect`, `mpifed evaluate`
... answer. Output, not logging: no timestamp, no rank, shown at every log level (messages
about the work go through mpifed.log)."""

from __future__ import annotations

import logging
import sys

from ..log import ROOT


def emit(text: str, end: str = "\n") -> None:
    """Write `text`, then `end`, to stdout, flushed (scripts read it as it comes)."""
    print(text, end=end, flush=True)


def progress(text: str) -> None:
    """Redraw `text` in place on a terminal's stderr (\\r); nothing under --quiet or into a
    file, where the result line that follows says it all."""
    if sys.stderr.isatty() and logging.getLogger(ROOT).isEnabledFor(logging.INFO):
        sys.stderr.write(f"\r{text}")
        sys.stderr.flush()
