"""Collective failure: when any rank meets a user error, every rank raises it together.

Validating inputs before the first collective and agreeing on the outcome (Heat's failure flag)
means no rank is left waiting in a collective that another rank will never reach.
"""

from __future__ import annotations

from ..errors import UserError


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
    messages = comm.allgather(message)
    failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
    if not failed:
        return result
    rank, text = failed[0]
    if len(failed) == comm.size and len({t for _, t in failed}) == 1:
        raise UserError(text)
    raise UserError(f"[rank {rank}] {text}")
