"""`Sequential`: a model that is a list of layers over one flat parameter buffer.

The layers' arrays are packed in order into one buffer (`Layout`); so are their gradients, so
one all-reduce moves them all, and `on_ready` tells the training step when one layer's slice of
the gradient buffer is final (last layer first) to start its reduction early.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from math import prod

import numpy as np

from ..errors import UserError
from .layers import Chain, Context, Layer
from .layout import Layout, views
from .loss import softmax_cross_entropy, summed_loss_and_correct

TRAIN = Context(train=True)
EVAL = Context(train=False)


class Sequential:
    """Layers applied in order to inputs (B, *input_shape), ending in logits (B, num_classes).

    kind: how the model was described ("sequential", a preset name, "factory"); `extra` holds
    what a model file needs to describe it again (hidden sizes, depth, the factory's name).
    """

    def __init__(self, layers: list[Layer], input_shape, num_classes: int,
                 kind: str = "sequential", where: str = "model.layers", **extra):
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise UserError(f"{where}[{i}]: {layer!r} is not an mpifed.nn layer "
                                "(see docs/model.md, Writing a layer)")
        self.kind, self.num_classes, self.extra = kind, int(num_classes), extra
        self.seed = 0  # dropout's seed: run.seed, set by whoever builds the model for training
        self.chain = Chain(list(layers))
        self.input_shape = ()
        self.build(input_shape, where)

    def build(self, input_shape, where: str = "model.layers") -> None:
        """(Re)build every layer for inputs of `input_shape`; errors name the layer."""
        input_shape = tuple(int(s) for s in input_shape)
        self._before_build()
        out = self.chain.build(input_shape, where)
        self._check_output(input_shape, out, where)
        self.input_shape = input_shape
        self._layouts, self._views = {}, OrderedDict()
        entries = [[(n, tuple(s)) for n, s in layer.params()] for layer in self.layers]
        self.entries = entries
        bounds = [0]
        for e in entries:
            bounds.append(bounds[-1] + len(e))
        self.bounds = bounds  # layer i's arrays are layout entries bounds[i]:bounds[i+1]

    def _before_build(self) -> None:
        """What a model does to its layers before they are built (a GPT ties its head)."""

    def _check_output(self, input_shape, out, where: str) -> None:
        """Refuse a last layer whose output the loss cannot take: one logit per class."""
        if out != (self.num_classes,):
            raise UserError(f"{where}: the last layer gives outputs of shape {out}, the loss "
                            f"needs ({self.num_classes},), one logit per class; end with "
                            f"{{type = \"linear\", out = {self.num_classes}}}")

    def _after_forward(self, logits) -> None:
        """Called between a training forward and its backward (a GPT counts activations)."""

    def loss(self, logits, y):
        """Return (mean loss, d loss / d logits) of this model's outputs against targets y."""
        return softmax_cross_entropy(logits, y)

    @property
    def layers(self) -> list[Layer]:
        return self.chain.layers

    # What the training loop, the reporter and the model files read.
    @property
    def features(self) -> int:
        return prod(self.input_shape)

    @property
    def hidden(self) -> tuple[int, ...]:
        return tuple(self.extra.get("hidden", ()))

    @property
    def sizes(self):
        if self.kind in ("softmax", "mlp"):
            return [self.features, *self.hidden, self.num_classes]
        shape = "x".join(map(str, self.input_shape))
        return f"[{shape} -> {self.num_classes}, {len(self.layers)} layers, " \
               f"{self.layout().size:,} parameters]"

    def __eq__(self, other):
        return isinstance(other, Sequential) and self.describe() == other.describe()

    def __hash__(self):
        return hash(repr(self.describe()))

    def describe(self):
        return (self.kind, self.input_shape, self.num_classes,
                tuple(repr(layer) for layer in self.layers),
                tuple(s for e in self.entries for _, s in e))

    def __repr__(self):
        return f"Sequential({self.kind}, {self.input_shape} -> {self.num_classes}, {self.layers})"

    # The flat buffer.
    def layout(self, dtype="float32") -> Layout:
        name = np.dtype(dtype).name
        if name not in self._layouts:
            shapes = [s for e in self.entries for _, s in e]
            offsets = [0]
            for s in shapes:
                offsets.append(offsets[-1] + prod(s))
            self._layouts[name] = Layout(tuple(shapes), (name,) * len(shapes), tuple(offsets),
                                         name)
        return self._layouts[name]

    def param_views(self, flat) -> list[dict]:
        """Per layer, {name: view of flat}; cached per buffer (views keep their buffer alive)."""
        key = (_address(flat), flat.size, flat.dtype.name)
        found = self._views.get(key)
        if found is None:
            arrays = views(flat, self.layout(flat.dtype))
            found = [{name: arrays[j] for j, (name, _) in zip(range(lo, hi), e)}
                     for e, lo, hi in zip(self.entries, self.bounds, self.bounds[1:])]
            self._views[key] = found
            if len(self._views) > 8:
                self._views.popitem(last=False)
        return found

    def layer_range(self, i: int, dtype) -> tuple[int, int]:
        """Elements [lo, hi) of the flat buffer that layer i's arrays occupy."""
        offsets = self.layout(dtype).offsets
        return offsets[self.bounds[i]], offsets[self.bounds[i + 1]]

    def buffer_ranges(self, dtype="float32") -> list[tuple[int, int]]:
        """Element ranges of the buffers (running statistics): state, not trained."""
        key = ("buffers", np.dtype(dtype).name)
        if key in self._layouts:
            return self._layouts[key]
        offsets, out = self.layout(dtype).offsets, []
        for layer, e, lo in zip(self.layers, self.entries, self.bounds):
            for j, (name, _) in enumerate(e):
                if name in layer.buffers:
                    out.append((offsets[lo + j], offsets[lo + j + 1]))
        self._layouts[key] = out
        return out

    def decayed_ranges(self, dtype="float32") -> tuple[tuple[int, int], ...]:
        """Element ranges of the arrays of two or more dimensions (weight matrices, kernels,
        embeddings): what AdamW's weight decay applies to; adjacent ranges merged."""
        offsets, out = self.layout(dtype).offsets, []
        shapes = [s for e in self.entries for _, s in e]
        for j, shape in enumerate(shapes):
            if len(shape) >= 2:
                if out and out[-1][1] == offsets[j]:
                    out[-1] = (out[-1][0], offsets[j + 1])
                else:
                    out.append((offsets[j], offsets[j + 1]))
        return tuple(out)

    def take_buffers(self, grads) -> list:
        """After the all-reduce: copy out the buffers' new values (backward wrote them into the
        gradient buffer, averaged over the ranks now) and zero them there, so the optimiser
        leaves them alone; `put_buffers` puts them into the parameters after its step."""
        kept = []
        for lo, hi in self.buffer_ranges(grads.dtype):
            kept.append((lo, hi, grads[lo:hi].copy()))
            grads[lo:hi] = 0
        return kept

    @staticmethod
    def put_buffers(params, kept) -> None:
        for lo, hi, values in kept:
            params[lo:hi] = values

    def init(self, seed: int, xp=np, dtype="float32"):
        """Return a flat parameter buffer initialised from `seed`, drawn on the host with NumPy
        so every rank and backend gets the same values."""
        host = np.zeros(self.layout(dtype).size, dtype=dtype)
        rng = np.random.default_rng([seed, 0x6D6F64])
        for layer, p in zip(self.layers, self.param_views(host)):
            layer.init(rng, p)
        self._views.clear()  # the host buffer goes away
        return xp.asarray(host)

    def init_range(self, seed: int, lo: int, hi: int, xp=np, dtype="float32"):
        """Return elements [lo, hi) of `init(seed)`'s buffer without ever holding the whole
        model: layer by layer, at most one layer's arrays besides the result (on the host)."""
        out = np.zeros(max(0, hi - lo), dtype=dtype)
        rng = np.random.default_rng([seed, 0x6D6F64])
        for i, layer in enumerate(self.layers):
            a, b = self.layer_range(i, dtype)
            part = np.zeros(b - a, dtype=dtype)
            layer.init(rng, self.layer_views(i, part))  # draws even when not kept: same stream
            x, y = max(a, lo), min(b, hi)
            if y > x:
                out[x - lo:y - lo] = part[x - a:y - a]
        return xp.asarray(out)

    # Forward and backward.
    def forward(self, flat, x, ctx: Context = EVAL):
        """Return logits (B, C) of inputs x (B, *input_shape).

        flat: the flat parameters, or a provider (i, lo, hi) -> layer i's elements, asked for
        in layer order (see `loss_and_grad`); x's dtype is then the parameters'.
        """
        ps = self._layer_source(flat, x.dtype if callable(flat) else flat.dtype)
        return self.chain.forward(ps, self._shaped(x), ctx)

    accumulate = 1  # optim.accumulate: micro-batches per step, set by the training loop

    def loss_and_grad(self, flat, x, y, grad_out, on_ready=None, ctx: Context = TRAIN,
                      loss_scale: float = 1.0):
        """The mean loss and gradient of `_loss_and_grad`, over `accumulate` micro-batches of
        x and y (B divisible by it): each micro-batch's gradient into a scratch buffer, their
        mean into grad_out before on_ready reports a layer final. Dropout differs per
        micro-batch (its step number is step * accumulate + j). loss_scale: as `_loss_and_grad`."""
        k = self.accumulate
        if k == 1:
            return self._loss_and_grad(flat, x, y, grad_out, on_ready, ctx, loss_scale)
        if callable(grad_out):
            raise RuntimeError("loss_and_grad: accumulate > 1 sums into whole gradient "
                               "buffers; a caller with per-layer buckets (the ZeRO-2/3 steps) "
                               "sets accumulate = 1 and hands micro-batches in itself")
        if x.shape[0] % k:
            raise UserError(f"optim.accumulate: a batch of {x.shape[0]} rows does not split "
                            f"into {k} micro-batches")
        rows, total = x.shape[0] // k, 0.0
        summed = grad_out.copy()
        summed[...] = 0
        for j in range(k - 1):
            part = dataclasses.replace(ctx, step=ctx.step * k + j)
            total += float(self._loss_and_grad(flat, x[j * rows:(j + 1) * rows],
                                               y[j * rows:(j + 1) * rows], grad_out, None, part,
                                               loss_scale))
            summed += grad_out
        ready = None
        if on_ready is not None:
            def ready(lo, hi, loss):  # the last micro-batch's layer is done: add the others
                grad_out[lo:hi] += summed[lo:hi]
                grad_out[lo:hi] /= k
                on_ready(lo, hi, (total + float(loss)) / k)
        last = dataclasses.replace(ctx, step=ctx.step * k + k - 1)
        loss = self._loss_and_grad(flat, x[(k - 1) * rows:], y[(k - 1) * rows:], grad_out, ready,
                                   last, loss_scale)
        if on_ready is None:
            grad_out += summed
            grad_out /= k
        return (total + float(loss)) / k

    def _loss_and_grad(self, flat, x, y, grad_out, on_ready=None, ctx: Context = TRAIN,
                       loss_scale: float = 1.0):
        """Write d(mean loss)/d(params) into `grad_out` (flat, like `flat`); return the loss.

        on_ready(lo, hi, loss): grad_out[lo:hi] (one layer's arrays) is final; last layer first.
        flat, grad_out: flat buffers, or providers (i, lo, hi) -> a flat array of layer i's
        hi - lo elements, asked for just before layer i needs it (a sharded step's parameters
        gathered per layer, its per-layer gradient buckets). The parameters are asked for in
        the order forward 0..L-1, then backward L-1..0; x's dtype is the parameters'.
        loss_scale: the gradients written are those of loss_scale * loss (mixed precision's
        loss scaling); the loss returned is not scaled. Half-precision logits are taken to
        float32 for the loss, whose gradient goes back in the parameters' dtype.
        """
        dtype = x.dtype if callable(flat) else flat.dtype
        ps, gs = self._layer_source(flat, dtype), self._layer_source(grad_out, dtype)
        h = self.chain.forward(ps, self._shaped(x), ctx)
        self._after_forward(h)
        if h.dtype.itemsize < 4:  # fp16/bf16 compute: the loss and its reduction in fp32
            h = h.astype(np.float32)
        loss, delta = self.loss(h, y)  # delta: (B, C)
        if loss_scale != 1.0:
            delta *= delta.dtype.type(loss_scale)
        delta = delta.astype(dtype, copy=False)
        done = None
        if on_ready is not None:
            def done(i):
                lo, hi = self.layer_range(i, dtype)
                if hi > lo:
                    on_ready(lo, hi, loss)
        self.chain.backward(ps, gs, delta, ctx, False, done)
        return loss

    def _layer_source(self, source, dtype):
        """Return i -> layer i's views: of a flat buffer, or of what a provider hands out."""
        if not callable(source):
            whole = self.param_views(source)
            return lambda i: whole[i]

        def views_of(i):
            lo, hi = self.layer_range(i, dtype)
            return self.layer_views(i, source(i, lo, hi) if hi > lo else None)
        return views_of

    def layer_views(self, i: int, part) -> dict:
        """Layer i's {name: view} of `part`, a flat array of just its elements (or None when the
        layer has no parameters)."""
        if part is None:
            return {}
        layout = self.layout(part.dtype)
        base = layout.offsets[self.bounds[i]]
        return {name: part[layout.offsets[j] - base:layout.offsets[j + 1] - base].reshape(shape)
                for j, (name, shape) in zip(range(self.bounds[i], self.bounds[i + 1]),
                                            self.entries[i])}

    def evaluate_batch(self, flat, x, y) -> tuple[float, int]:
        return summed_loss_and_correct(self.forward(flat, x, EVAL), y)

    def _shaped(self, x):
        """Rows (B, features) of image data come shaped (B, *input_shape)."""
        if x.shape[1:] != self.input_shape:
            x = x.reshape(x.shape[0], *self.input_shape)
        return x


def _address(a) -> int:
    """The address of an array's first element (NumPy or CuPy)."""
    if isinstance(a, np.ndarray):
        return a.__array_interface__["data"][0]
    return a.data.ptr
