"""Preemption: SIGUSR1 or SIGTERM asks the run to checkpoint and stop at the next step boundary.

The handler only sets a flag; the ranks agree on it collectively (it rides in the step's
all-reduce, or a tiny one per round), so every rank stops after the same step.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopFlag:
    """Install handlers for SIGUSR1/SIGTERM (main thread only); `.raised` names the signal or ''."""

    def __init__(self):
        self.raised = ""
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False

    @property
    def value(self) -> float:
        return 1.0 if self.raised else 0.0
