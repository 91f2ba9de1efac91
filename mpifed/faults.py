"""Fault injection for tests: MPIFED_FAULT="ACTION:POINT:NUMBER:RANK" makes world rank RANK do
ACTION when the run reaches POINT (e.g. "step", "round") number NUMBER.

Actions: "stop" sends the process SIGSTOP (a rank that stops answering, as a hung node would).
Placeholder until the full fault hook lands; the call signature stays.
"""

from __future__ import annotations

import os
import signal


def inject(point: str, number: int, rank: int) -> None:
    """Do the action MPIFED_FAULT names when it names this point, number and rank."""
    spec = os.environ.get("MPIFED_FAULT")
    if not spec:
        return
    action, _, rest = spec.partition(":")
    if rest != f"{point}:{number}:{rank}":
        return
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
