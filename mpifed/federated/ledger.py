"""The privacy ledger: every DP release of a run, in run.out/privacy-ledger.jsonl.

The root appends one line per round before any vector of that round is sent (append-only,
flushed and fsynced), so a crash can lose a checkpoint but never a release: a resumed run
composes every line, rounds run again after a crash included, and federated.dp.max_epsilon
counts them too. The ledger is never moved or reset: a new run in the same run.out, even after a
finished one whose model is set aside, may resume that run's model, so it keeps composing.
"""

from __future__ import annotations

import json
import os

from .dp import account

LEDGER = "privacy-ledger.jsonl"


class PrivacyLedger:
    """The ledger file of run.out (on the root only)."""

    def __init__(self, out: str):
        self.path = os.path.join(out, LEDGER)
        self.entries = self._read()

    def _read(self) -> list[dict]:
        if not os.path.exists(self.path):
            return []
        with open(self.path) as fh:
            return [json.loads(line) for line in fh if line.strip().endswith("}")]

    def append(self, entry: dict) -> None:
        """Append `entry` as one line and fsync it before returning."""
        new = not os.path.exists(self.path)
        with open(self.path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        if new:  # the file's directory entry must survive a crash too
            fd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.entries.append(entry)


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
