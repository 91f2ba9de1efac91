"""Clipping the global gradient norm (PyTorch's clip_grad_norm_), over whole or sharded
gradients."""

from __future__ import annotations

import numpy as np

from ..xp import get_array_module, to_host


def clip_grad_norm(grads, max_norm: float, sum_over_shards=None) -> float:
    """Scale `grads` in place so that their global L2 norm is at most `max_norm`; return the
    norm before clipping.

    sum_over_shards: sums a float64 host array of one element over the ranks that each hold a
    part of the gradients (the sharded steps' chunks); None where `grads` is whole. The scale
    is PyTorch's: max_norm / (norm + 1e-6), applied only when below 1.
    """
    xp = get_array_module(grads)
    square = np.array([float(to_host(xp.dot(grads, grads)))], dtype=np.float64)
    if sum_over_shards is not None:
        square = sum_over_shards(square)
    norm = float(np.sqrt(square[0]))
    scale = max_norm / (norm + 1e-6)
    if scale < 1:
        grads *= grads.dtype.type(scale)
    return norm
