"""`residual`: output = input + the sublayers' output, through a 1x1 projection when the
sublayers change the shape (He et al. 2016's projection shortcut)."""

from __future__ import annotations

from .base import Layer
from .chain import Chain
from .conv import Conv2d
from .dense import Linear


class Residual(Layer):
    """y = f(x) + x, or f(x) + P x where P is a 1x1 convolution (images; stride from the size
    ratio) or a linear map (vectors) when f changes the shape."""

    type = "residual"

    def __init__(self, layers: list[Layer]):
        self.chain = Chain(list(layers))
        self.projection = None

    def settings(self):
        return {}

    def build(self, in_shape, where):
        self.in_shape, self.where = tuple(in_shape), where
        out = self.chain.build(self.in_shape, f"{where}.layers")
        self.projection = None
        if out != self.in_shape:
            self.projection = self._projection(self.in_shape, out)
        self.out_shape = out
        return out

    def _projection(self, in_shape, out) -> Layer:
        if len(in_shape) == 3 and len(out) == 3 and out[1] <= in_shape[1]:
            proj = Conv2d(out[0], 1, stride=max(1, -(-in_shape[1] // out[1])))  # ceil
        elif len(in_shape) == 1 and len(out) == 1:
            proj = Linear(out[0])
        else:
            self.fail(f"its sublayers map {in_shape} to {out}; no 1x1 projection joins them")
        got = proj.build(in_shape, f"{self.where}.projection")
        if got != out:
            self.fail(f"its sublayers map {in_shape} to {out}; a 1x1 projection gives {got}")
        return proj

    def children(self) -> list[tuple[str, Layer]]:
        """(prefix, layer) of every layer inside, in parameter order."""
        kids = [(f"layers.{i}.", layer) for i, layer in enumerate(self.chain.layers)]
        return kids + ([("projection.", self.projection)] if self.projection else [])

    def params(self):
        return [(prefix + name, shape) for prefix, layer in self.children()
                for name, shape in layer.params()]

    @property
    def buffers(self):
        return tuple(prefix + name for prefix, layer in self.children() for name in layer.buffers)

    def init(self, rng, p):
        for prefix, layer in self.children():
            layer.init(rng, _part(p, prefix))

    def forward(self, p, x, ctx):
        h = self.chain.forward(lambda i: _part(p, f"layers.{i}."), x, ctx)
        if self.projection is None:
            return h + x
        return h + _run(ctx, self.projection, "forward", _part(p, "projection."), x, ctx)

    def backward(self, p, g, dy, ctx, need_dx=True):
        dx = self.chain.backward(lambda i: _part(p, f"layers.{i}."),
                                 lambda i: _part(g, f"layers.{i}."), dy, ctx, need_dx)
        if self.projection is None:
            return dx + dy if need_dx else None
        dskip = _run(ctx, self.projection, "backward", _part(p, "projection."),
                     _part(g, "projection."), dy, ctx, need_dx)
        return dx + dskip if need_dx else None


def _run(ctx, layer, pass_name: str, *args):
    """layer.forward or layer.backward on args, timed when ctx.timings is on."""
    fn = getattr(layer, pass_name)
    return fn(*args) if ctx.timings is None else ctx.timings.call(layer, pass_name, fn, *args)


def _part(views: dict, prefix: str) -> dict:
    """The entries of `views` under `prefix`, with the prefix removed."""
    n = len(prefix)
    return {k[n:]: v for k, v in views.items() if k.startswith(prefix)}
