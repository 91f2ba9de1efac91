"""The privacy ledger: every DP release of a run, in run.out/privacy-ledger.jsonl.

The root appends one line per round before any vector of that round is sent (append-only,
flushed and fsynced), so a crash can lose a checkpoint but never a release: a resumed run
composes every line, rounds run again after a crash included, and federated.dp.max_epsilon
counts them too. The ledger is never moved or reset: a new run in the same run.out, even after a
finished one whose model is set aside, may resume that run's model, so it keeps composing.

Every other leader keeps its own copy of the public entries (round, z, q, delta, accountant;
the participants only where the root sees them anyway) in run.out/institution-K/, and computes
the budget from it, so a root cannot talk it past federated.dp.max_epsilon.

A crash in the middle of a write leaves a torn last line (no newline). Opening the ledger cuts
it off (`cut` says how many bytes): that release never finished its fsync, so no vector of its
round was sent. A damaged line before the last one is refused instead: it was once whole.
"""

from __future__ import annotations

import hashlib
import json
import os

from ..errors import UserError
from .dp import account

LEDGER = "privacy-ledger.jsonl"


def ledger_path(out: str, institution: int = 0) -> str:
    """Return the ledger file of institution `institution` in run.out `out` (0: the root's)."""
    if institution == 0:
        return os.path.join(out, LEDGER)
    return os.path.join(out, f"institution-{institution}", LEDGER)


class PrivacyLedger:
    """One ledger file: the root's (institution 0), or another leader's copy."""

    def __init__(self, out: str, institution: int = 0):
        self.path = ledger_path(out, institution)
        self.cut = 0  # bytes of a torn last line dropped on open
        self.lines: list[bytes] = []  # each entry's line as written, newline included
        self.entries = self._read()

    def _read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path, "rb") as fh:
            data = fh.read()
        whole = data.rfind(b"\n") + 1  # the end of the last complete line
        if whole < len(data):
            self.cut = len(data) - whole
            with open(self.path, "r+b") as fh:  # never append after half a line
                fh.truncate(whole)
                fh.flush()
                os.fsync(fh.fileno())
        entries = []
        for number, line in enumerate(data[:whole].splitlines(keepends=True), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                raise UserError(f"federated.dp: line {number} of the privacy ledger "
                                f"{self.path!r} is damaged, and it is not the last one, so it "
                                "is no torn write; restore the file from a backup (deleting it "
                                "would reset the privacy budget)")
            entries.append(entry)
            self.lines.append(line)
        return entries

    def append(self, entry: dict) -> None:
        """Append `entry` as one line and fsync it before returning."""
        new = not os.path.exists(self.path)
        if new:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        line = (json.dumps(entry) + "\n").encode()
        with open(self.path, "ab") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # the file's directory entry must survive a crash too
            fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.entries.append(entry)
        self.lines.append(line)

    def prefix_sha256(self, count: int) -> str:
        """Return the SHA-256 (hex) of the first `count` lines' bytes, as written."""
        return hashlib.sha256(b"".join(self.lines[:count])).hexdigest()


def release_entry(dp, rnd: int, q: float, participants: list[int] | None) -> dict:
    """The ledger line of round `rnd` (0-based): the mechanism, as the accountant needs it.

    participants: None under secure aggregation (amplified by the secret Poisson sample);
    otherwise the institutions the root saw send, each accounted without amplification.
    """
    entry = {"round": rnd + 1, "noise_multiplier": dp.noise_multiplier, "q": q,
             "delta": dp.delta, "accountant": dp.accountant}
    if participants is not None:
        entry.update(q=1.0, participants=list(participants))
    return entry


def ledger_epsilon(dp, entries: list[dict], institutions: int
                   ) -> tuple[float, list[float] | None]:
    """Return (epsilon, epsilon per institution or None) of every release in `entries`.

    Secure aggregation's entries (no participant list) compose as Poisson-sampled Gaussians;
    the others per institution, over the rounds each took part in, without amplification, and
    the epsilon is the largest of them.
    """
    sampled: dict = {}
    per: list[dict] = [{} for _ in range(institutions)]
    for e in entries:
        event = (e["q"], e["noise_multiplier"])
        if "participants" in e:
            for k in e["participants"]:
                per[k][event] = per[k].get(event, 0) + 1
        else:
            sampled[event] = sampled.get(event, 0) + 1
    acc, delta = dp.accountant, dp.delta
    if not any(per):
        return account(acc, sampled, delta), None
    each = [account(acc, {e: sampled.get(e, 0) + events.get(e, 0)
                          for e in {*sampled, *events}}, delta) for events in per]
    return max(each), each


def unamplified(entries: list[dict]) -> list[dict]:
    """Return `entries` as if every round sent were not sampled (q = 1): what an observer who
    tells sampled institutions apart (by timing, say) is owed, `epsilon_unamplified`."""
    return [dict(e, q=1.0) for e in entries]
