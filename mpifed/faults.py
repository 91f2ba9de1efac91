"""Fault injection for tests: make a rank raise, die or freeze at a named step or round.

The training loops call `inject(point, number, rank)` at fixed places; nothing happens unless the
environment variable MPIFED_FAULT names that point, number and rank:

    MPIFED_FAULT="ACTION:POINT=NUMBER[:rank=R]"

    MPIFED_FAULT="kill:step=5:rank=1"   # world rank 1 SIGKILLs itself after data-parallel step 5
    MPIFED_FAULT="raise:round=2"        # every rank raises RuntimeError after federated round 2
    MPIFED_FAULT="kill:step=5:rank=2,3" # ranks 2 and 3 (a whole node of 2 x 2) die after step 5

Points: `step` (the data-parallel loop, after step NUMBER is taken, before it is reported or
checkpointed) and `round` (the federated loop, after round NUMBER, before it is reported or
checkpointed). Without `rank=` every rank acts. Actions:

    raise   raise RuntimeError("injected fault raise:step=5:rank=1")
    kill    os.kill(own pid, SIGKILL): the process dies at once, as under the OOM killer
    exit    os._exit(1): the process ends without cleanup or MPI_Finalize
    stop    os.kill(own pid, SIGSTOP): the process freezes until it gets SIGCONT (a stall)

The variable is read at each call, not at import, so a test can set it for one launch only
(`env=` of the subprocess). A malformed value raises ValueError naming MPIFED_FAULT and the
expected form; it is checked only when a loop reaches an injection point.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

ENV = "MPIFED_FAULT"
ACTIONS = ("raise", "kill", "exit", "stop")
POINTS = ("step", "round")
FORM = "ACTION:POINT=NUMBER[:rank=R[,R...]], e.g. kill:step=5:rank=1"


@dataclass(frozen=True)
class Fault:
    """One parsed MPIFED_FAULT: act at `point` number `number` on `rank` (None: every rank)."""

    action: str
    point: str
    number: int
    rank: int | tuple[int, ...] | None = None  # a tuple: several ranks (one node's, say)

    def __str__(self) -> str:
        ranks = ",".join(map(str, self.rank)) if isinstance(self.rank, tuple) else self.rank
        rank = "" if self.rank is None else f":rank={ranks}"
        return f"{self.action}:{self.point}={self.number}{rank}"


def parse(text: str) -> Fault:
    """Return the Fault that `text` (an MPIFED_FAULT value) names; raise ValueError if malformed."""
    parts = text.strip().split(":")
    action, fields = parts[0], parts[1:]
    if action not in ACTIONS:
        raise ValueError(f"{ENV}={text!r}: unknown action {action!r}; use one of {ACTIONS} "
                         f"({FORM})")
    values = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep or key not in POINTS + ("rank",) or key in values:
            raise ValueError(f"{ENV}={text!r}: cannot read {field!r}; expected {FORM}")
        try:
            numbers = tuple(int(v) for v in value.split(",")) if key == "rank" else (int(value),)
        except ValueError:
            raise ValueError(f"{ENV}={text!r}: {key} must be a whole number, got {value!r}; "
                             f"expected {FORM}") from None
        if min(numbers) < 0:
            raise ValueError(f"{ENV}={text!r}: {key} must be >= 0, got {value}; expected {FORM}")
        values[key] = numbers[0] if len(numbers) == 1 else numbers
    points = [p for p in POINTS if p in values]
    if len(points) != 1:
        raise ValueError(f"{ENV}={text!r}: name exactly one of {POINTS}; expected {FORM}")
    return Fault(action, points[0], values[points[0]], values.get("rank"))


def inject(point: str, number: int, rank: int) -> None:
    """Act on the fault MPIFED_FAULT names if it is this point, number and rank; else return.

    point: "step" or "round"; number: the step or round just finished (1-based); rank: this
    process's world rank.
    """
    text = os.environ.get(ENV)
    if not text:
        return
    fault = parse(text)
    if fault.point != point or fault.number != number:
        return
    if fault.rank is not None and rank not in (
            fault.rank if isinstance(fault.rank, tuple) else (fault.rank,)):
        return
    if fault.action == "raise":
        raise RuntimeError(f"injected fault {fault} ({ENV})")
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "exit":
        os._exit(1)
    elif fault.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
