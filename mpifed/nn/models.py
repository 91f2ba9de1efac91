"""`softmax` (multinomial logistic regression) and `mlp` (ReLU) with hand-written backward.

All parameters live in one flat buffer, with per-layer views W (in x out) and b (out), so one
all-reduce moves all gradients. Layer i maps (B, in_i) to (B, out_i); ReLU between layers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from ..errors import UserError
from ..xp import get_array_module
from .layout import Layout, views
from .loss import softmax_cross_entropy, summed_loss_and_correct

KINDS = ("softmax", "mlp")


@dataclass(frozen=True)
class ModelSpec:
    """The architecture: kind, input features, hidden sizes (mlp only), classes."""

    kind: str
    features: int
    hidden: tuple[int, ...]
    num_classes: int

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UserError(f"model.kind: {self.kind!r} is not a model; use one of {KINDS}")
        if self.kind == "softmax" and self.hidden:
            raise UserError("model.hidden: a softmax model has no hidden layers; "
                            "remove model.hidden or set model.kind = \"mlp\"")
        if self.kind == "mlp" and not self.hidden:
            raise UserError("model.hidden: an mlp needs at least one hidden size, e.g. [128]")

    @property
    def sizes(self) -> list[int]:
        return [self.features, *self.hidden, self.num_classes]

    def layout(self, dtype="float32") -> Layout:
        """Return the flat-buffer layout: W0, b0, W1, b1, ..."""
        return _layout(self, np.dtype(dtype).name)


@functools.lru_cache(maxsize=64)
def _layout(spec: ModelSpec, name: str) -> Layout:
    """Compute a spec's layout once per dtype: a training step asks for it every time."""
    shapes, offsets = [], [0]
    for fan_in, fan_out in zip(spec.sizes, spec.sizes[1:]):
        for shape in ((fan_in, fan_out), (fan_out,)):
            shapes.append(shape)
            offsets.append(offsets[-1] + int(np.prod(shape)))
    return Layout(tuple(shapes), (name,) * len(shapes), tuple(offsets), name)


def init_params(spec: ModelSpec, seed: int, xp=np, dtype="float32"):
    """Return a flat parameter buffer initialised from `seed` (He normal W, zero b).

    Drawn on the host with NumPy, so every rank and every backend gets the same values.
    """
    layout = spec.layout(dtype)
    rng = np.random.default_rng([seed, 0x6D6F64])
    host = np.zeros(layout.size, dtype=dtype)
    for w in views(host, layout)[0::2]:
        w[...] = rng.standard_normal(w.shape) * np.sqrt(2.0 / w.shape[0])
    return xp.asarray(host)


def logits(spec: ModelSpec, flat, x):
    """Return logits (B, C) of inputs x (B, features)."""
    layers = views(flat, spec.layout(flat.dtype))
    h = x
    for i in range(0, len(layers), 2):
        h = h @ layers[i]
        h += layers[i + 1]
        if i + 2 < len(layers):
            h = _relu(h)
    return h


def _relu(h):
    xp = get_array_module(h)
    return xp.maximum(h, 0, out=h)


def layer_ranges(spec: ModelSpec, dtype="float32") -> list[tuple[int, int]]:
    """Return each layer's [lo, hi) in the flat buffer (its W then its b), first layer first."""
    offsets = spec.layout(dtype).offsets
    return [(offsets[i], offsets[i + 2]) for i in range(0, len(offsets) - 1, 2)]


def _layer_arrays(source, layout: Layout):
    """Return a function layer -> (W, b): views of a flat buffer, or of what `source` hands out.

    source: a flat buffer, or a function (layer, lo, hi) -> a flat array of hi - lo elements
    (a sharded step's per-layer buffer: gathered parameters, or a gradient bucket).
    """
    if not callable(source):
        whole = views(source, layout)
        return lambda k: (whole[2 * k], whole[2 * k + 1])

    def arrays(k):
        lo, mid, hi = layout.offsets[2 * k:2 * k + 3]
        flat = source(k, lo, hi)
        return flat[:mid - lo].reshape(layout.shapes[2 * k]), flat[mid - lo:]
    return arrays


def loss_and_grad(spec: ModelSpec, flat, x, y, grad_out, on_ready=None):
    """Write d(mean loss)/d(params) into `grad_out` (flat, like `flat`); return the mean loss.

    x: (B, features) in the parameters' dtype; y: (B,) integer labels.
    on_ready(lo, hi, loss): called as soon as grad_out[lo:hi] (one layer's W and b) is final,
    last layer first, so that its all-reduce can start while earlier layers still compute.
    flat, grad_out: flat buffers, or functions (layer, lo, hi) -> flat array of layer's
    elements (ZeRO: parameters gathered per layer, gradients written into per-layer buckets).
    Parameters are asked for in the order forward 0..L-1, then backward L-1..1 (the first
    layer's W is not needed to go further down).
    """
    dtype = x.dtype if callable(flat) else flat.dtype
    layout = spec.layout(dtype)
    params_of, grads_of = _layer_arrays(flat, layout), _layer_arrays(grad_out, layout)
    count = len(layout.shapes) // 2
    activations = [x]  # input of each layer, post-ReLU
    h = x
    xp = get_array_module(x)
    for k in range(count):
        w, b = params_of(k)
        h = h @ w  # (B, out_k)
        h += b
        if k + 1 < count:
            h = _relu(h)
            activations.append(h)
    loss, delta = softmax_cross_entropy(h, y)  # delta: (B, C)
    delta = delta.astype(dtype, copy=False)
    for k in range(count - 1, -1, -1):
        inputs = activations[k]
        gw, gb = grads_of(k)
        xp.matmul(inputs.T, delta, out=gw)  # (in, out), straight into the flat buffer
        delta.sum(axis=0, out=gb)  # (out,)
        if k > 0:
            w, _ = params_of(k)
        if on_ready is not None:
            on_ready(layout.offsets[2 * k], layout.offsets[2 * k + 2], loss)
        if k > 0:
            delta = delta @ w.T
            delta *= inputs > 0  # ReLU' of the layer below
    return loss


def evaluate_batch(spec: ModelSpec, flat, x, y) -> tuple[float, int]:
    """Return (summed loss, correct count) of the model on one batch."""
    return summed_loss_and_correct(logits(spec, flat, x), y)
