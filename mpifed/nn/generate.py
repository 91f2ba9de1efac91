"""Sampling text from a GPT, as nanoGPT's `GPT.generate`: the context cropped to block_size,
the last position's logits divided by the temperature, all but the top k set to -inf, one
token drawn from the softmax (temperature 0: the most likely token)."""

from __future__ import annotations

import numpy as np

from ..errors import UserError
from .layers.base import Context


def generate(model, flat, ids, tokens: int, temperature: float = 1.0, top_k: int = 0,
             seed: int = 0) -> np.ndarray:
    """Return `ids` (1-D ints) followed by `tokens` sampled continuations (host int64)."""
    if temperature < 0:
        raise UserError(f"--temperature: expected a number >= 0, got {temperature}")
    if top_k < 0:
        raise UserError(f"--top-k: expected an integer >= 0 (0: all tokens), got {top_k}")
    out = [int(i) for i in ids]
    if not out:
        raise UserError("--prompt: give at least one character to continue")
    block = model.layers[0].block_size
    rng = np.random.default_rng(seed)
    for _ in range(tokens):
        context = np.asarray(out[-block:], dtype=flat.dtype)[None, :]  # (1, t)
        logits = np.asarray(model.forward(flat, context, Context(train=False)))[0, -1]
        out.append(next_token(logits.astype(np.float64), temperature, top_k, rng))
    return np.asarray(out, dtype=np.int64)


def next_token(logits, temperature: float, top_k: int, rng) -> int:
    """One token drawn from (V,) logits (see module)."""
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if 0 < top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return int(rng.choice(logits.size, p=p))
