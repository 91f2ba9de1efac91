"""Per-layer-type timings of forward and backward: what a convnet spends its step on.

Off by default and free when off: `Chain` and `Residual` test `ctx.timings is None` once per
pass and take their plain loop. On, each layer's call is timed on the host clock after
`sync()` (the GPU stream's synchronize, so kernels are charged to the layer that queued them),
and a layer that holds others (`residual`) is charged only its own work (the sum, the
projection goes to `conv2d`).

    timings = LayerTimings(sync=lambda: synchronize(xp))
    model.loss_and_grad(flat, x, y, grad, ctx=Context(timings=timings))
    timings.table()  # {(type, "forward" | "backward"): seconds}
"""

from __future__ import annotations

import time
from collections import defaultdict


class LayerTimings:
    """Seconds per (layer type, pass), exclusive of nested layers; calls counted alike."""

    def __init__(self, sync=None, clock=time.perf_counter):
        """sync: waits for queued device work (None on the host); clock: seconds now, e.g.
        time.process_time for CPU time, which a busy machine disturbs less than wall time."""
        self.sync, self.clock = sync or (lambda: None), clock
        self.seconds: dict = defaultdict(float)
        self.calls: dict = defaultdict(int)
        self._inner = [0.0]  # per open span: seconds spent in nested spans

    def call(self, layer, pass_name: str, fn, *args):
        """Return fn(*args), charging its time (less nested layers') to (layer.type, pass)."""
        self.sync()
        start = self.clock()
        self._inner.append(0.0)
        try:
            out = fn(*args)
            self.sync()
        finally:
            spent = self.clock() - start
            nested = self._inner.pop()
            self._inner[-1] += spent
        key = (layer.type, pass_name)
        self.seconds[key] += spent - nested
        self.calls[key] += 1
        return out

    def table(self) -> dict:
        """{(type, pass): seconds}, the largest first."""
        return dict(sorted(self.seconds.items(), key=lambda kv: -kv[1]))

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()
