"""`linear` (y = x W + b, W stored in x out) and `flatten` (row-major, as PyTorch's nn.Flatten)."""

from __future__ import annotations

from math import prod

import numpy as np

from ...xp import get_array_module
from .base import Layer, positive, sum_into


class Linear(Layer):
    """(B, in) -> (B, out). W (in, out) He-normal, b (out,) zero."""

    type = "linear"

    def __init__(self, out: int, in_features: int | None = None):
        self.out = positive("linear", "out", out)
        self.in_features = in_features  # fixed when loaded from a file; else from the input

    def output_shape(self, in_shape):
        if len(in_shape) != 1:
            self.fail(f"input shape {in_shape} is not flat; a linear layer takes (features,): "
                      f"add {{type = \"flatten\"}} before it")
        if self.in_features is not None and in_shape[0] != self.in_features:
            self.fail(f"input shape {in_shape} does not fit W of shape "
                      f"({self.in_features}, {self.out})")
        self.in_features = in_shape[0]  # W's shape is fixed from now on
        return (self.out,)

    def params(self):
        return [("W", (self.in_shape[0], self.out)), ("b", (self.out,))]

    def init(self, rng, p):
        w = rng.standard_normal(p["W"].shape)  # float64; scaled in place: one temporary, not two
        w *= np.sqrt(2.0 / self.in_shape[0])
        p["W"][...] = w

    def settings(self):
        return {"out": self.out}

    def forward(self, p, x, ctx):
        self.x = x  # (B, in)
        y = x @ p["W"]  # (B, out)
        y += p["b"]
        return y

    def backward(self, p, g, dy, ctx, need_dx=True):
        xp = get_array_module(dy)
        xp.matmul(self.x.T, dy, out=g["W"])  # (in, out), straight into the flat buffer
        sum_into(dy, 0, g["b"])  # (out,)
        self.x = None
        return dy @ p["W"].T if need_dx else None  # (B, in)


class Flatten(Layer):
    """(B, *shape) -> (B, prod(shape)), row-major."""

    type = "flatten"

    def output_shape(self, in_shape):
        return (prod(in_shape),)

    def forward(self, p, x, ctx):
        return x.reshape(x.shape[0], -1)

    def backward(self, p, g, dy, ctx, need_dx=True):
        return dy.reshape((dy.shape[0], *self.in_shape)) if need_dx else None
