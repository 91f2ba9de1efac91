"""`causal_self_attention`: multi-head self-attention over a sequence, each position seeing only
itself and the positions before it (nanoGPT's CausalSelfAttention, written out so its backward
sits beside it).

    qkv = x W_attn^T + b_attn                  (B, T, 3C) one fused projection
    q, k, v                                    (B, H, T, D) with D = C / H
    a = softmax(q k^T / sqrt(D) + mask)        (B, H, T, T) mask: -inf above the diagonal
    y = (dropout(a) v) W_proj^T + b_proj       (B, T, C), then dropout

The softmax subtracts each row's maximum before exp, so no score overflows.
"""

from __future__ import annotations

import math

from ...xp import get_array_module
from .base import Layer, positive
from .functional import dropout_mask, linear, linear_backward, salt_of


def _dropout_p(value, key: str) -> float:
    from ...errors import UserError

    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise UserError(f"{key}: expected a probability in [0, 1), got {value!r}")
    return float(value)


class CausalSelfAttention(Layer):
    """(B, T, C) -> (B, T, C); parameters c_attn.weight (3C, C), c_attn.bias (3C,),
    c_proj.weight (C, C), c_proj.bias (C,), PyTorch's [out, in] layout and nanoGPT's names."""

    type = "causal_self_attention"

    def __init__(self, n_head: int, dropout: float = 0.0, n_layer: int = 1):
        self.n_head = positive("causal_self_attention", "n_head", n_head)
        self.dropout = _dropout_p(dropout, "causal_self_attention.dropout")
        self.n_layer = positive("causal_self_attention", "n_layer", n_layer)
        self._mask = {}

    def settings(self):
        return {"n_head": self.n_head, "dropout": self.dropout, "n_layer": self.n_layer}

    def output_shape(self, in_shape):
        if len(in_shape) != 2:
            self.fail(f"input shape {in_shape} is not (positions, features)")
        if in_shape[1] % self.n_head:
            self.fail(f"{in_shape[1]} features do not split into {self.n_head} heads; "
                      "make n_embd a multiple of n_head")
        self.salt = salt_of(self.where)
        return in_shape

    def params(self):
        c = self.in_shape[-1]
        return [("c_attn.weight", (3 * c, c)), ("c_attn.bias", (3 * c,)),
                ("c_proj.weight", (c, c)), ("c_proj.bias", (c,))]

    def init(self, rng, p):
        """nanoGPT's: N(0, 0.02) weights, the residual projection's scaled by 1/sqrt(2 L)."""
        p["c_attn.weight"][...] = rng.standard_normal(p["c_attn.weight"].shape) * 0.02
        std = 0.02 / math.sqrt(2 * self.n_layer)
        p["c_proj.weight"][...] = rng.standard_normal(p["c_proj.weight"].shape) * std

    def _causal(self, t: int, xp, dtype):
        """The (T, T) additive mask: 0 on and below the diagonal, -inf above."""
        key = (t, xp.__name__, dtype.str)
        if key not in self._mask:
            upper = xp.triu(xp.ones((t, t), dtype=bool), k=1)
            self._mask[key] = xp.where(upper, dtype.type(-xp.inf), dtype.type(0)).astype(dtype)
        return self._mask[key]

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        b, t, c = x.shape
        h, d = self.n_head, c // self.n_head
        qkv = linear(x, p["c_attn.weight"], p["c_attn.bias"])  # (B, T, 3C)
        heads = qkv.reshape(b, t, 3, h, d).transpose(2, 0, 3, 1, 4)  # (3, B, H, T, D)
        q, k, v = heads[0], heads[1], heads[2]
        # the scale on q (B, H, T, D), a quarter of the scores' size when T = 4 D
        att = (q * x.dtype.type(1 / math.sqrt(d))) @ k.transpose(0, 1, 3, 2)  # (B, H, T, T)
        att += self._causal(t, xp, x.dtype)
        att -= att.max(axis=-1, keepdims=True)  # stable: every row's largest score is 0
        xp.exp(att, out=att)
        total = att.sum(axis=-1, keepdims=True)
        att *= xp.reciprocal(total, out=total)  # (B, H, T, T) probabilities
        mask = dropout_mask(att.shape, self.dropout, ctx, self.salt, x.dtype, xp)
        dropped = att if mask is None else att * mask
        y = (dropped @ v).transpose(0, 2, 1, 3).reshape(b, t, c)  # (B, T, C)
        out = linear(y, p["c_proj.weight"], p["c_proj.bias"])  # (B, T, C)
        out_mask = dropout_mask(out.shape, self.dropout, ctx, self.salt + 1, x.dtype, xp)
        if out_mask is not None:
            out *= out_mask
        self.cache = (x, q, k, v, att, mask, dropped, y, out_mask)
        return out

    def cache_bytes(self) -> int:
        """Bytes of the arrays held from forward to backward."""
        seen, total = set(), 0
        for a in getattr(self, "cache", None) or ():
            if a is not None and id(a) not in seen:
                seen.add(id(a))
                total += a.nbytes  # q, k, v: views that together are qkv
        return total

    def backward(self, p, g, dout, ctx, need_dx=True):
        xp = get_array_module(dout)
        x, q, k, v, att, mask, dropped, y, out_mask = self.cache
        self.cache = None
        b, t, c = x.shape
        h, d = self.n_head, c // self.n_head
        if out_mask is not None:
            dout = dout * out_mask
        dy = linear_backward(y, p["c_proj.weight"], dout, g["c_proj.weight"], g["c_proj.bias"])
        dy = dy.reshape(b, t, h, d).transpose(0, 2, 1, 3)  # (B, H, T, D)
        dqkv = xp.empty((3, b, h, t, d), dtype=x.dtype)
        xp.matmul(dropped.transpose(0, 1, 3, 2), dy, out=dqkv[2])  # dv (B, H, T, D)
        datt = dy @ v.transpose(0, 1, 3, 2)  # (B, H, T, T)
        if mask is not None:
            datt *= mask
        # softmax: ds = a * (da - sum(da * a)); masked entries have a = 0, so ds = 0 there
        datt -= (datt * att).sum(axis=-1, keepdims=True)
        datt *= att
        xp.matmul(datt, k, out=dqkv[0])  # dq, before the scale
        xp.matmul(datt.transpose(0, 1, 3, 2), q, out=dqkv[1])  # dk, before the scale
        dqkv[:2] *= x.dtype.type(1 / math.sqrt(d))  # the scores' scale, on (B, H, T, D)
        dqkv = dqkv.transpose(1, 3, 0, 2, 4).reshape(b, t, 3 * c)  # (B, T, 3C)
        return linear_backward(x, p["c_attn.weight"], dqkv, g["c_attn.weight"],
                               g["c_attn.bias"], need_dx)
