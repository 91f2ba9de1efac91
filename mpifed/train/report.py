"""What rank 0 shows and writes: a progress bar or plain lines, and OUT/metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
import time


class Reporter:
    """Progress on the terminal and JSON lines in OUT/metrics.jsonl; silent on ranks other than 0."""

    def __init__(self, out: str, active: bool, total_steps: int, mode: str = "auto",
                 append: bool = False):
        self.active, self.total = active, total_steps
        if mode == "auto":
            mode = "bar" if sys.stdout.isatty() else "lines"
        self.mode = mode
        path = os.path.join(out, "metrics.jsonl")
        self._fh = open(path, "a" if append else "w") if active else None
        self._last_bar = 0.0

    def record(self, **fields) -> None:
        """Append one JSON object to metrics.jsonl."""
        if self._fh:
            self._fh.write(json.dumps(fields) + "\n")
            self._fh.flush()

    def step(self, step: int, epoch: int, loss: float, lr: float, samples_per_s: float,
             comm_fraction: float, log: bool) -> None:
        """Report a finished step (1-based `step`); write a metrics record when `log`."""
        if not self.active:
            return
        if log:
            self.record(event="step", step=step, epoch=epoch, loss=loss, lr=lr,
                        samples_per_s=samples_per_s, comm_fraction=comm_fraction)
        text = (f"step {step}/{self.total} epoch {epoch} loss {loss:.4f} lr {lr:.4g} "
                f"{samples_per_s:,.0f} samples/s comm {100 * comm_fraction:.0f}%")
        if self.mode == "bar":
            now = time.monotonic()
            if now - self._last_bar > 0.1 or step == self.total:
                filled = int(30 * step / max(self.total, 1))
                bar = "#" * filled + "." * (30 - filled)
                print(f"\r[{bar}] {text}", end="\n" if step == self.total else "", flush=True)
                self._last_bar = now
        elif self.mode == "lines" and log:
            print(text, flush=True)

    def line(self, text: str) -> None:
        if self.active and self.mode != "none":
            print(text, flush=True)

    def close(self) -> None:
        if self._fh:
            self._fh.close()
