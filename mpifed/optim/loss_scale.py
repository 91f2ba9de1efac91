"""Loss scaling for half-precision gradients (Micikevicius et al. 2018; PyTorch's GradScaler).

The loss's gradient is multiplied by `scale` before the half-precision backward, so small
gradients do not flush to zero, and divided by it again in fp32 before the update. A dynamic
scaler halves the scale after a step whose gradients overflowed (that step is skipped: no
update, optimiser state unchanged) and doubles it after `growth_interval` clean steps in a row.

    scaler = LossScaler(65536.0, growth_interval=2000, dynamic=True)
    skip = scaler.update(found_inf)   # once per step, with the flag agreed over every rank

A pure state machine on Python floats: every rank holding the same flags holds the same scale.
"""

from __future__ import annotations

GROWTH, BACKOFF = 2.0, 0.5


class LossScaler:
    """The loss scale and its clean-step count; `dynamic` False keeps the scale fixed (a step
    with inf/NaN gradients is still skipped)."""

    def __init__(self, init: float = 65536.0, growth_interval: int = 2000,
                 dynamic: bool = True):
        self.scale, self.growth_interval, self.dynamic = float(init), int(growth_interval), dynamic
        self.clean_steps = 0  # clean steps since the last growth or backoff
        self.skipped = 0  # steps skipped so far (reported in the summary)

    def update(self, found_inf: bool) -> bool:
        """Advance one step; return True if the step must be skipped (found_inf)."""
        if found_inf:
            self.skipped += 1
            self.clean_steps = 0
            if self.dynamic:
                self.scale *= BACKOFF
            return True
        self.clean_steps += 1
        if self.dynamic and self.clean_steps >= self.growth_interval:
            self.scale *= GROWTH
            self.clean_steps = 0
        return False

    def state(self) -> dict:
        """The scaler's state, for checkpoints (JSON-safe scalars)."""
        return {"scale": self.scale, "clean_steps": self.clean_steps, "skipped": self.skipped}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned."""
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
        self.skipped = int(state.get("skipped", 0))
