"""The model functions the training code calls, over any `Sequential` model (layers.py):
`softmax` and `mlp` are presets of the same layer library.

All parameters live in one flat buffer with per-layer views, so one all-reduce moves all
gradients. `ModelSpec(kind, features, hidden, num_classes)` builds the softmax or mlp preset.
"""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .layers import Context
from .presets import mlp, softmax
from .sequential import Sequential

LEGACY_KINDS = ("softmax", "mlp")  # the presets whose files keep the layout before the layers
DTYPES = ("float32", "float64")  # model.dtype: the parameters' and the features' dtype


def ModelSpec(kind: str, features, hidden=(), num_classes: int = 2) -> Sequential:  # noqa: N802
    """Return the softmax or mlp preset on inputs of `features` (an int or a shape)."""
    shape = (features,) if isinstance(features, (int, np.integer)) else tuple(features)
    if kind not in LEGACY_KINDS:
        raise UserError(f"model.kind: {kind!r} is not a model; use one of {LEGACY_KINDS}")
    if kind == "softmax":
        if hidden:
            raise UserError("model.hidden: a softmax model has no hidden layers; "
                            "remove model.hidden or set model.kind = \"mlp\"")
        return softmax(shape, num_classes)
    return mlp(shape, tuple(hidden), num_classes)


def init_params(spec: Sequential, seed: int, xp=np, dtype="float32"):
    """Return a flat parameter buffer initialised from `seed` (He normal weights, zero biases,
    unit scales); drawn on the host with NumPy, so every rank and backend agrees."""
    return spec.init(seed, xp, dtype)


def logits(spec: Sequential, flat, x):
    """Return logits (B, C) of inputs x (B, *input_shape) or (B, features), in eval mode."""
    return spec.forward(flat, x)


def loss_and_grad(spec: Sequential, flat, x, y, grad_out, on_ready=None,
                  ctx: Context | None = None, loss_scale: float = 1.0):
    """Write d(mean loss)/d(params) into `grad_out` (flat, like `flat`); return the mean loss.

    x: (B, *input_shape) or (B, features) in the parameters' dtype; y: (B,) integer labels.
    on_ready(lo, hi, loss): called as soon as grad_out[lo:hi] (one layer's arrays) is final,
    last layer first, so that its all-reduce can start while earlier layers still compute.
    ctx: training context (step, rank, seed, the ranks' reducer); training mode by default.
    loss_scale: write the gradients of loss_scale * loss (mixed precision); the loss returned
    is not scaled.
    """
    return spec.loss_and_grad(flat, x, y, grad_out, on_ready, ctx or Context(seed=spec.seed),
                              loss_scale)


def evaluate_batch(spec: Sequential, flat, x, y) -> tuple[float, int]:
    """Return (summed loss, correct count) of the model on one batch (evaluation mode)."""
    return spec.evaluate_batch(flat, x, y)
