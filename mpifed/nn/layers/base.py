"""The layer protocol: told its input shape, a layer answers its output and parameter shapes.

A layer is a small object (JAX stax's shape-first layers, Chainer's forward and backward side by
side). Shapes exclude the batch axis; images are (channels, height, width).

    out_shape = layer.build(in_shape, where)   # check the input, fix every shape; `where` names
                                               # the layer in errors: "model.layers[3]"
    layer.params()      -> [(name, shape), ...] arrays the layer owns in the flat buffer
    layer.buffers       -> names among them that are state, not trained (running statistics)
    layer.init(rng, p)  -> fill p (dict name -> host view) from a NumPy Generator
    y  = layer.forward(p, x, ctx)               # p: dict of views of the parameters
    dx = layer.backward(p, g, dy, ctx, need_dx) # g: dict of views of the gradient buffer;
                                                # writes every g[name], returns d loss / d x
    layer.settings()    -> the keys written to model files (type excluded)

A layer never allocates its parameters or gradients: `p` and `g` are windows into the flat
buffers that the all-reduce, the optimiser and the checkpoint see. For a buffer (running
statistics) `backward` writes the state's new value into `g`, and the training step moves it
into the parameters after the all-reduce has averaged it over the ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ...errors import UserError
from ..precision import accumulator


@dataclass
class Context:
    """What a forward pass may depend on besides its input.

    train: batch statistics and dropout (True) or running statistics and identity (False).
    seed, step, rank: seed dropout's generator, so a resumed run draws the same masks.
    reduce: sums a small 1-D xp array over the data-parallel ranks (in place, returns it);
        None alone. Passed in, so that nothing under nn/ imports MPI.
    timings: a `profile.LayerTimings` that charges each layer's forward and backward time to
        its type; None (the default) costs nothing.
    """

    train: bool = True
    seed: int = 0
    step: int = 0
    rank: int = 0
    reduce: Callable | None = None
    timings: object | None = None


class Layer:
    """Defaults for a layer without parameters; subclasses override what they need."""

    type = "layer"
    buffers: tuple[str, ...] = ()

    def build(self, in_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        self.in_shape, self.where = tuple(in_shape), where
        self.out_shape = tuple(self.output_shape(self.in_shape))
        return self.out_shape

    def output_shape(self, in_shape):
        return in_shape

    def params(self) -> list[tuple[str, tuple[int, ...]]]:
        return []

    def init(self, rng, p: dict) -> None:
        pass

    def settings(self) -> dict:
        return {}

    def scratch(self, name: str, shape, dtype, xp, zeroed: bool = False):
        """Return this layer's working array `name` of `shape`, kept from call to call.

        Large working arrays (the column matrix) are allocated once: a fresh one of tens of MB
        costs more in page faults than the copy that fills it. zeroed: filled with zeros when
        made (a padding border that later calls never write stays zero). Never returned to the
        caller: a layer's outputs are fresh arrays.
        """
        cache = self.__dict__.setdefault("_scratch", {})
        key = (name, tuple(shape), np.dtype(dtype).str, xp.__name__)
        found = cache.get(key)
        if found is None:
            for old in [k for k in cache if k[0] == name]:
                del cache[old]  # one per name: a new batch size replaces the old array
            found = (xp.zeros if zeroed else xp.empty)(shape, dtype=dtype)
            cache[key] = found
        return found

    def fail(self, message: str):
        """Raise the one-line UserError that names this layer: `where (type): message`."""
        raise UserError(f"{self.where} ({self.type}): {message}")

    def __repr__(self):
        keys = ", ".join(f"{k}={v}" for k, v in self.settings().items())
        return f"{self.type}({keys})"


def need_rank(layer: Layer, in_shape, ranks: tuple[int, ...], what: str) -> None:
    """Fail unless the input (batch axis excluded) has one of `ranks` dimensions."""
    if len(in_shape) not in ranks:
        layer.fail(f"input shape {tuple(in_shape)} does not fit: it needs {what}")


def positive(layer_type: str, key: str, value, minimum: int = 1) -> int:
    """Check an integer setting; raise a UserError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{layer_type}.{key}: expected an integer >= {minimum}, got {value!r}")
    return value


def acc_sum(x, axis):
    """Return x.sum(axis), accumulated in float32 when x is half precision (fp16 overflows past
    65504; ml_dtypes adds bfloat16 in bfloat16) and in x's own dtype otherwise."""
    if x.dtype.itemsize >= 4:
        return x.sum(axis=axis)
    return x.sum(axis=axis, dtype=accumulator(x.dtype))


def sum_into(x, axis, out):
    """Write x.sum(axis) into `out` (a gradient view), accumulated as `acc_sum` does."""
    if x.dtype.itemsize >= 4:
        return x.sum(axis=axis, out=out)
    out[...] = acc_sum(x, axis)
    return out
