"""A list of layers run one after the other: the body of `Sequential` and of `residual`."""

from __future__ import annotations


class Chain:
    """Builds, runs forward and backward through `layers` in order."""

    def __init__(self, layers: list):
        self.layers = layers

    def build(self, in_shape: tuple[int, ...], where: str) -> tuple[int, ...]:
        """Build every layer on its predecessor's output; return the last output shape.

        where: the name of the list in errors, e.g. "model.layers" -> "model.layers[3]".
        """
        shape = tuple(in_shape)
        for i, layer in enumerate(self.layers):
            shape = tuple(layer.build(shape, f"{where}[{i}]"))
        return shape

    def forward(self, params_of, x, ctx):
        """params_of(i): layer i's parameter views."""
        timings = ctx.timings
        for i, layer in enumerate(self.layers):
            if timings is None:
                x = layer.forward(params_of(i), x, ctx)
            else:
                x = timings.call(layer, "forward", layer.forward, params_of(i), x, ctx)
        return x

    def backward(self, params_of, grads_of, dy, ctx, need_dx=True, on_done=None):
        """Back through the layers, last first; return d loss / d input (None unless need_dx).

        on_done(i): called once layer i's parameter gradients are final.
        """
        timings = ctx.timings
        trained = [bool(layer.params()) for layer in self.layers]
        for i in range(len(self.layers) - 1, -1, -1):
            wanted = need_dx or any(trained[:i])  # no input gradient below the first weights
            layer = self.layers[i]
            if timings is None:
                dy = layer.backward(params_of(i), grads_of(i), dy, ctx, wanted)
            else:
                dy = timings.call(layer, "backward", layer.backward, params_of(i), grads_of(i),
                                  dy, ctx, wanted)
            if on_done is not None:
                on_done(i)
        return dy
