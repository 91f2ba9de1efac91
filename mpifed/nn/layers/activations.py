"""Element-wise layers: `relu`, `tanh`, `gelu` and `dropout`."""

from __future__ import annotations

import numpy as np

from ...errors import UserError
from ...xp import get_array_module
from .base import Layer
from .functional import gelu, gelu_backward


class ReLU(Layer):
    type = "relu"

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        self.y = xp.maximum(x, 0)  # (B, ...)
        return self.y

    def backward(self, p, g, dy, ctx, need_dx=True):
        dx = dy * (self.y > 0) if need_dx else None
        self.y = None
        return dx


class Tanh(Layer):
    type = "tanh"

    def forward(self, p, x, ctx):
        self.y = get_array_module(x).tanh(x)
        return self.y

    def backward(self, p, g, dy, ctx, need_dx=True):
        dx = dy * (1 - self.y * self.y) if need_dx else None
        self.y = None
        return dx


class GELU(Layer):
    """x * Phi(x) in its tanh form (PyTorch's GELU(approximate="tanh")), as the transformer
    block's MLP computes it (functional.gelu)."""

    type = "gelu"

    def forward(self, p, x, ctx):
        y, self.cache = gelu(x, "tanh")
        return y

    def backward(self, p, g, dy, ctx, need_dx=True):
        cache, self.cache = self.cache, None
        return gelu_backward(dy, cache, "tanh") if need_dx else None


class Dropout(Layer):
    """Zero each element with probability p while training, scale the rest by 1/(1-p).

    The mask comes from a NumPy generator seeded by (run.seed, step, rank, layer): the same on
    every backend and after a resume.
    """

    type = "dropout"

    def __init__(self, p: float = 0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p < 1:
            raise UserError(f"dropout.p: expected a probability in [0, 1), got {p!r}")
        self.p = float(p)

    def settings(self):
        return {"p": self.p}

    def build(self, in_shape, where):
        self.salt = sum(ord(c) * 31 ** i for i, c in enumerate(where)) % (1 << 32)
        return super().build(in_shape, where)

    def forward(self, p, x, ctx):
        self.mask = None
        if not ctx.train or self.p == 0:
            return x
        xp = get_array_module(x)
        rng = np.random.default_rng([ctx.seed, ctx.step, ctx.rank, self.salt])
        keep = rng.random(x.shape) >= self.p  # (B, ...) on the host
        self.mask = xp.asarray(keep.astype(x.dtype) / x.dtype.type(1 - self.p))
        return x * self.mask

    def backward(self, p, g, dy, ctx, need_dx=True):
        if not need_dx:
            return None
        return dy if self.mask is None else dy * self.mask
