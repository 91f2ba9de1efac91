"""What rank 0 shows and writes: a progress bar (tqdm) or plain lines, and OUT/metrics.jsonl."""

from __future__ import annotations

import json
import os
import sys
import time

from tqdm import tqdm

# run.progress: "auto" is "bar" on a terminal and "lines" otherwise; "none" prints nothing.
from ..choices import PROGRESS_MODES  # noqa: F401 (run.progress, named here before)

# The bar: percentage, bar, steps done, elapsed and remaining time, then the step's figures.
BAR_FORMAT = "{l_bar}{bar}| step {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"


class LossWindow:
    """The mean of the step losses added since the last `take` (a step record's loss_avg)."""

    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, loss: float) -> None:
        self.total, self.count = self.total + float(loss), self.count + 1

    def take(self) -> float:
        """Return the window's mean (NaN if empty) and start the next window."""
        mean = self.total / self.count if self.count else float("nan")
        self.total, self.count = 0.0, 0
        return mean


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
        self._bar = None
        self.losses = LossWindow()

    def record(self, **fields) -> None:
        """Append one JSON object to metrics.jsonl."""
        if self._fh:
            self._fh.write(json.dumps(fields) + "\n")
            self._fh.flush()

    def step(self, step: int, epoch: int, loss: float, lr: float, samples_per_s: float,
             comm_fraction: float, log: bool) -> None:
        """Report a finished step (1-based `step`); write a metrics record when `log`: the
        wall-clock `time` (seconds since the epoch), the step's `loss` and `loss_avg`, the mean
        of the step losses since the previous step record (this one's included)."""
        if not self.active:
            return
        self.losses.add(loss)
        if log:
            self.record(event="step", step=step, epoch=epoch, time=time.time(), loss=loss,
                        loss_avg=self.losses.take(), lr=lr, samples_per_s=samples_per_s,
                        comm_fraction=comm_fraction)
        figures = (f"epoch {epoch} loss {loss:.4f} lr {lr:.4g} {samples_per_s:,.0f} samples/s "
                   f"comm {100 * comm_fraction:.0f}%")
        if self.mode == "bar":
            self._advance_bar(step, figures)
        elif self.mode == "lines" and log:
            print(f"step {step}/{self.total} {figures}", flush=True)

    def _advance_bar(self, step: int, figures: str) -> None:
        """Move the bar to `step`; tqdm redraws at most every 0.1 s and always at the end."""
        if self._bar is None:  # a resumed run starts its bar at the step it resumes from
            self._bar = tqdm(total=self.total, initial=step - 1, file=sys.stdout,
                             dynamic_ncols=True, mininterval=0.1, bar_format=BAR_FORMAT)
        self._bar.set_postfix_str(figures, refresh=False)
        self._bar.update(step - self._bar.n)
        if step >= self.total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def line(self, text: str) -> None:
        """Print one line of text (above the bar while a bar is drawn)."""
        if not self.active or self.mode == "none":
            return
        if self._bar is not None:
            self._bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        self._close_bar()
        if self._fh:
            self._fh.close()
