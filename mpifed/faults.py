"""Fault injection for tests: make a rank raise, die or freeze at a named step or round, or an
institution send a tampered update.

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
    pause   signal.pause(): the process sleeps until a signal handler runs (a stop signal
            arriving late: Open MPI's mpirun sends SIGCONT at once and SIGTERM only later)
    overflow  (step only) under model.precision fp16/bf16, the rank's gradients of step NUMBER
            hold an inf, as an fp16 overflow would (`overflows`): every rank must skip it

A misbehaving institution, for the robust strategies (mpifed/federated/robust.py):

    MPIFED_FAULT="byzantine:K:MODE[:SCALE]"

    MPIFED_FAULT="byzantine:2:scale"       # institution 2 sends global + 100 x its update
    MPIFED_FAULT="byzantine:4:noise:0.5"   # institution 4 adds N(0, 0.5^2) to its model
    MPIFED_FAULT="byzantine:3,7:signflip"  # institutions 3 and 7 both send sign-flipped updates

institution K's leader sends, every round, a tampered model in place of its own, where it leaves
on the plain exchange to the root (`tampered`): with u its update (its model - the global one),

    signflip   global - SCALE u        (SCALE default 1)
    scale      global + SCALE u        (default 100)
    noise      its model + Gaussian noise of std SCALE, seeded by (K, round) (default 1)
    constant   SCALE in every coordinate (default 100)
    nan        NaN in every coordinate (no SCALE)

A federation checks it before round 1 (K must be one of its institutions; secure aggregation and
DP, whose exchange it does not reach, refuse it) and that leader logs a warning naming it.

The variable is read at each call, not at import, so a test can set it for one launch only
(`env=` of the subprocess). A malformed value raises ValueError naming MPIFED_FAULT and the
expected form; it is checked only when a loop reaches an injection point.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass

import numpy as np

ENV = "MPIFED_FAULT"
ACTIONS = ("raise", "kill", "exit", "stop", "pause", "overflow", "byzantine")
POINTS = ("step", "round")
FORM = "ACTION:POINT=NUMBER[:rank=R[,R...]], e.g. kill:step=5:rank=1"
BYZANTINE_FORM = ("byzantine:K:MODE[:SCALE] (K: one institution, or several as 3,7), e.g. "
                  "byzantine:2:scale:100")
BYZANTINE_SCALES = {"signflip": 1.0, "scale": 100.0, "noise": 1.0, "constant": 100.0,
                    "nan": None}  # each mode's SCALE when none is given


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


@dataclass(frozen=True)
class Byzantine:
    """One parsed MPIFED_FAULT=byzantine:K:MODE[:SCALE]: institution K tampers with its update."""

    institution: int
    mode: str
    scale: float | None  # None: nan (no scale)
    others: tuple[int, ...] = ()  # further institutions that tamper alike: byzantine:K1,K2:MODE

    @property
    def institutions(self) -> tuple[int, ...]:
        """Every tampering institution."""
        return (self.institution, *self.others)

    def __str__(self) -> str:
        scale = "" if self.scale is None else f":{self.scale:g}"
        return f"byzantine:{','.join(map(str, self.institutions))}:{self.mode}{scale}"


def parse(text: str) -> Fault | Byzantine:
    """Return the Fault or Byzantine that `text` (an MPIFED_FAULT value) names; raise ValueError
    if malformed."""
    parts = text.strip().split(":")
    action, fields = parts[0], parts[1:]
    if action == "byzantine":
        return _parse_byzantine(text, fields)
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
    if action == "overflow" and points[0] != "step":
        raise ValueError(f"{ENV}={text!r}: overflow acts on a data-parallel step's gradients; "
                         "write overflow:step=NUMBER[:rank=R]")
    return Fault(action, points[0], values[points[0]], values.get("rank"))


def _parse_byzantine(text: str, fields: list[str]) -> Byzantine:
    def refuse(why: str):
        raise ValueError(f"{ENV}={text!r}: {why}; expected {BYZANTINE_FORM}")

    if len(fields) not in (2, 3):
        refuse("name the institution and the mode")
    institution, mode = fields[0], fields[1]
    listed = institution.split(",")
    if not all(k.isdigit() for k in listed) or len(set(listed)) != len(listed):
        refuse(f"the institution must be a whole number >= 0, got {institution!r} (several: "
               "comma-separated, each once)")
    if mode not in BYZANTINE_SCALES:
        refuse(f"unknown mode {mode!r}; use one of {tuple(BYZANTINE_SCALES)}")
    scale = BYZANTINE_SCALES[mode]
    if len(fields) == 3:
        if mode == "nan":
            refuse("nan takes no SCALE")
        try:
            scale = float(fields[2])
        except ValueError:
            refuse(f"SCALE must be a number, got {fields[2]!r}")
        if not math.isfinite(scale) or (mode == "noise" and scale < 0):
            refuse(f"SCALE must be finite (and >= 0 for noise), got {fields[2]!r}")
    first, *others = (int(k) for k in listed)
    return Byzantine(first, mode, scale, tuple(others))


def byzantine() -> Byzantine | None:
    """Return the Byzantine institution MPIFED_FAULT names, or None (unset, or another fault)."""
    text = os.environ.get(ENV)
    fault = parse(text) if text else None
    return fault if isinstance(fault, Byzantine) else None


def tampered(fault: Byzantine, global_params, params, round_index: int):
    """Return what `fault`'s institution sends in place of `params` (its model after the round
    that started from `global_params`); inputs unchanged. Host (NumPy) arrays: it runs where
    the update leaves for the root, already in host memory."""
    update = params - global_params
    if fault.mode == "signflip":
        return global_params - fault.scale * update
    if fault.mode == "scale":
        return global_params + fault.scale * update
    if fault.mode == "noise":
        rng = np.random.default_rng([fault.institution, round_index, 0x62797a])
        return params + rng.normal(0.0, fault.scale, size=params.shape).astype(params.dtype)
    return np.full_like(params, np.nan if fault.mode == "nan" else fault.scale)


def inject(point: str, number: int, rank: int) -> None:
    """Act on the fault MPIFED_FAULT names if it is this point, number and rank; else return.

    point: "step" or "round"; number: the step or round just finished (1-based); rank: this
    process's world rank.
    """
    text = os.environ.get(ENV)
    if not text:
        return
    fault = parse(text)
    if isinstance(fault, Byzantine):  # acts where an update leaves, not at a point (tampered)
        return
    if fault.point != point or fault.number != number:
        return
    if fault.rank is not None and rank not in (
            fault.rank if isinstance(fault.rank, tuple) else (fault.rank,)):
        return
    if fault.action == "overflow":  # acts inside the step, before the exchange (overflows)
        return
    if fault.action == "raise":
        raise RuntimeError(f"injected fault {fault} ({ENV})")
    if fault.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault.action == "exit":
        os._exit(1)
    elif fault.action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif fault.action == "pause":
        signal.pause()


def overflows(step: int, rank: int) -> bool:
    """Tell whether MPIFED_FAULT="overflow:step=NUMBER[:rank=R]" asks this rank's gradients of
    `step` (1-based) to hold an inf (mixed precision's skipped-step test)."""
    text = os.environ.get(ENV)
    if not text or not text.startswith("overflow:"):
        return False
    fault = parse(text)
    if fault.point != "step" or fault.number != step:
        return False
    return fault.rank is None or rank in (
        fault.rank if isinstance(fault.rank, tuple) else (fault.rank,))
