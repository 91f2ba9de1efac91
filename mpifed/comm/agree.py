"""Collective failure: when any rank meets a user error, every rank raises it together.

Validating inputs before the first collective and agreeing on the outcome (Heat's failure flag)
means no rank is left waiting in a collective that another rank will never reach. The messages
travel as UTF-8 bytes in numeric buffers (upper-case mpi4py methods), never pickled: ranks of
different institutions must not unpickle each other's bytes.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError


def gather_texts(comm, text: str | None) -> list[str | None]:
    """Return every rank's `text` (None where a rank has none), without pickle."""
    data = np.frombuffer(text.encode(), dtype=np.uint8) if text is not None else \
        np.zeros(0, dtype=np.uint8)
    lengths = np.zeros(comm.size, dtype=np.int64)
    comm.Allgather(np.array([len(data) if text is not None else -1], dtype=np.int64), lengths)
    counts = np.maximum(lengths, 0)
    if not counts.any():
        return [None if n < 0 else "" for n in lengths]
    everything = np.empty(int(counts.sum()), dtype=np.uint8)
    comm.Allgatherv(data, [everything, counts])
    offsets = np.concatenate([[0], np.cumsum(counts)])
    return [None if n < 0 else everything[offsets[r]:offsets[r + 1]].tobytes().decode(
        errors="replace") for r, n in enumerate(lengths)]


def raise_together(comm, fn):
    """Call fn() on every rank of `comm`; if it raised UserError anywhere, raise it everywhere.

    The message is the lowest failing rank's, prefixed with "[rank r]" when not all ranks failed
    alike. Returns fn()'s result when every rank succeeded.
    """
    result, message = None, None
    try:
        result = fn()
    except UserError as err:
        message = str(err)
    messages = gather_texts(comm, message)
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if not failed:
        return result
    rank, text = failed[0]
    if len(failed) == comm.size and len({t for _, t in failed}) == 1:
        raise UserError(text)
    raise UserError(f"[rank {rank}] {text}")
