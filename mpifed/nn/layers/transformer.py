"""`transformer_block`: nanoGPT's pre-LayerNorm block, x + attn(ln_1(x)), then + mlp(ln_2(.)).

    a = x + attn(ln_1(x))                            (B, T, C)
    y = a + dropout(c_proj(gelu(c_fc(ln_2(a)))))     c_fc: C -> 4C, c_proj: 4C -> C

With `recompute`, forward keeps only its input and backward runs the forward again before
going back through it (activation recomputation, Chen et al. 2016): the block's activations
live one block at a time instead of all blocks at once. Dropout masks are drawn from
(seed, step, rank, place), so the recomputed forward is the same forward.
"""

from __future__ import annotations

import math

from ...errors import UserError
from ...xp import get_array_module
from .attention import CausalSelfAttention, _dropout_p
from .base import Layer, positive
from .functional import (
    GELU_FORMS,
    dropout_mask,
    gelu,
    gelu_backward,
    layernorm,
    layernorm_backward,
    linear,
    linear_backward,
    salt_of,
)

EPS = 1e-5  # PyTorch's LayerNorm default, as nanoGPT


def _part(views: dict, prefix: str) -> dict:
    n = len(prefix)
    return {k[n:]: v for k, v in views.items() if k.startswith(prefix)}


class TransformerBlock(Layer):
    """(B, T, C) -> (B, T, C). Parameters under nanoGPT's names: ln_1.weight/bias,
    attn.c_attn.weight/bias, attn.c_proj.weight/bias, ln_2.weight/bias, mlp.c_fc.weight/bias,
    mlp.c_proj.weight/bias (weights [out, in])."""

    type = "transformer_block"

    def __init__(self, n_head: int, dropout: float = 0.0, gelu: str = "tanh",
                 n_layer: int = 1, recompute: bool = False):
        if gelu not in GELU_FORMS:
            raise UserError(f"model.gelu: {gelu!r} is not one of {', '.join(GELU_FORMS)}")
        if not isinstance(recompute, bool):
            raise UserError(f"model.recompute: expected true or false, got {recompute!r}")
        self.dropout = _dropout_p(dropout, "transformer_block.dropout")
        self.n_layer = positive("transformer_block", "n_layer", n_layer)
        self.gelu, self.recompute = gelu, recompute
        self.attn = CausalSelfAttention(n_head, dropout, n_layer)
        self.cache = None

    @property
    def n_head(self) -> int:
        return self.attn.n_head

    def settings(self):
        return {"n_head": self.n_head, "dropout": self.dropout, "gelu": self.gelu,
                "n_layer": self.n_layer, "recompute": self.recompute}

    def output_shape(self, in_shape):
        self.attn.build(in_shape, f"{self.where}.attn")
        self.salt = salt_of(self.where)
        return in_shape

    def params(self):
        c = self.in_shape[-1]
        return [("ln_1.weight", (c,)), ("ln_1.bias", (c,)),
                *[("attn." + name, shape) for name, shape in self.attn.params()],
                ("ln_2.weight", (c,)), ("ln_2.bias", (c,)),
                ("mlp.c_fc.weight", (4 * c, c)), ("mlp.c_fc.bias", (4 * c,)),
                ("mlp.c_proj.weight", (c, 4 * c)), ("mlp.c_proj.bias", (c,))]

    def init(self, rng, p):
        """nanoGPT's: unit LayerNorm scales, N(0, 0.02) weights, the residual projections'
        scaled by 1/sqrt(2 n_layer), zero biases (drawn in parameter order)."""
        p["ln_1.weight"][...] = 1.0
        self.attn.init(rng, _part(p, "attn."))
        p["ln_2.weight"][...] = 1.0
        p["mlp.c_fc.weight"][...] = rng.standard_normal(p["mlp.c_fc.weight"].shape) * 0.02
        std = 0.02 / math.sqrt(2 * self.n_layer)
        p["mlp.c_proj.weight"][...] = rng.standard_normal(p["mlp.c_proj.weight"].shape) * std

    def _forward(self, p, x, ctx):
        """The block's output and everything its backward needs."""
        xp = get_array_module(x)
        h1, ln1 = layernorm(x, p["ln_1.weight"], p["ln_1.bias"], EPS)  # (B, T, C)
        a = x + self.attn.forward(_part(p, "attn."), h1, ctx)
        attn_cache = self.attn.cache
        h2, ln2 = layernorm(a, p["ln_2.weight"], p["ln_2.bias"], EPS)
        f = linear(h2, p["mlp.c_fc.weight"], p["mlp.c_fc.bias"])  # (B, T, 4C)
        u, gelu_cache = gelu(f, self.gelu)
        m = linear(u, p["mlp.c_proj.weight"], p["mlp.c_proj.bias"])  # (B, T, C)
        mask = dropout_mask(m.shape, self.dropout, ctx, self.salt, x.dtype, xp)
        if mask is not None:
            m *= mask
        y = a + m
        return y, (ln1, attn_cache, ln2, h2, gelu_cache, u, mask)

    def forward(self, p, x, ctx):
        y, cache = self._forward(p, x, ctx)
        self.attn.cache = None
        self.x, self.cache = x, (None if self.recompute and ctx.train else cache)
        return y

    def cache_bytes(self, cache=None) -> int:
        """Bytes of the activations this block holds from forward to backward (its input
        alone when recomputing; `cache`: count that cache instead)."""
        cache = self.cache if cache is None else cache
        if cache is None:
            return 0 if getattr(self, "x", None) is None else self.x.nbytes
        seen, total = set(), 0

        def walk(item):
            nonlocal total
            if isinstance(item, tuple):
                for sub in item:
                    walk(sub)
            elif item is not None and hasattr(item, "nbytes") and id(item) not in seen:
                seen.add(id(item))
                total += item.nbytes
        walk(cache)
        walk(self.x)
        return total

    def backward(self, p, g, dy, ctx, need_dx=True):
        x, cache = self.x, self.cache
        if cache is None:  # recompute: the same forward again, its activations kept this time
            _, cache = self._forward(p, x, ctx)
            self.peak_recompute_bytes = self.cache_bytes(cache)
        self.x = self.cache = None
        ln1, attn_cache, ln2, h2, gelu_cache, u, mask = cache
        dm = dy if mask is None else dy * mask
        du = linear_backward(u, p["mlp.c_proj.weight"], dm, g["mlp.c_proj.weight"],
                             g["mlp.c_proj.bias"])
        df = gelu_backward(du, gelu_cache, self.gelu)
        dh2 = linear_backward(h2, p["mlp.c_fc.weight"], df, g["mlp.c_fc.weight"],
                              g["mlp.c_fc.bias"])
        da = layernorm_backward(dh2, p["ln_2.weight"], ln2, g["ln_2.weight"], g["ln_2.bias"])
        da += dy
        self.attn.cache = attn_cache
        dh1 = self.attn.backward(_part(p, "attn."), _part(g, "attn."), da, ctx)
        dx = layernorm_backward(dh1, p["ln_1.weight"], ln1, g["ln_1.weight"], g["ln_1.bias"])
        dx += da
        return dx
