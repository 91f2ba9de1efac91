"""`embedding` (token plus learned position embedding) and `tied_head` (final LayerNorm, then
logits through the token embedding's own matrix), the two ends of a GPT.

The head has no matrix of its own: it reads the embedding's `wte.weight` (one slot of the flat
buffer) and hands its gradient back to the embedding, whose backward adds it to the
embedding's own, so the slot's gradient is the sum of both uses (weight tying, Press and Wolf
2017). `tie(head, embedding)` joins them; a GPT model does it when it is built.
"""

from __future__ import annotations

from ...errors import UserError
from ...xp import get_array_module
from .attention import _dropout_p
from .base import Layer, positive
from .functional import dropout_mask, layernorm, layernorm_backward, salt_of
from .transformer import EPS


class Embedding(Layer):
    """(B, T) token ids (any numeric dtype) -> (B, T, C): wte[ids] + wpe[:T], then dropout.

    Parameters wte.weight (V, C) and wpe.weight (block_size, C), N(0, 0.02) as nanoGPT's.
    """

    type = "embedding"

    def __init__(self, vocab_size: int, block_size: int, n_embd: int, dropout: float = 0.0):
        self.vocab_size = positive("embedding", "vocab_size", vocab_size)
        self.block_size = positive("embedding", "block_size", block_size)
        self.n_embd = positive("embedding", "n_embd", n_embd)
        self.dropout = _dropout_p(dropout, "embedding.dropout")
        self.copy_weight = False  # set by the model when parameter views do not outlive a layer
        self.head_grad = self.weight = None

    def settings(self):
        return {"vocab_size": self.vocab_size, "block_size": self.block_size,
                "n_embd": self.n_embd, "dropout": self.dropout}

    def output_shape(self, in_shape):
        if len(in_shape) != 1 or in_shape[0] > self.block_size:
            self.fail(f"input shape {in_shape} is not (positions,) of at most block_size = "
                      f"{self.block_size} token ids")
        self.salt = salt_of(self.where)
        return (in_shape[0], self.n_embd)

    def params(self):
        return [("wte.weight", (self.vocab_size, self.n_embd)),
                ("wpe.weight", (self.block_size, self.n_embd))]

    def init(self, rng, p):
        p["wte.weight"][...] = rng.standard_normal(p["wte.weight"].shape) * 0.02
        p["wpe.weight"][...] = rng.standard_normal(p["wpe.weight"].shape) * 0.02

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        wte = p["wte.weight"]
        ids = x.astype(xp.int64)  # (B, T)
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise UserError(f"{self.where} (embedding): token ids must be in [0, "
                            f"{self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        t = ids.shape[1]
        h = wte[ids]  # (B, T, C)
        h += p["wpe.weight"][:t]
        mask = dropout_mask(h.shape, self.dropout, ctx, self.salt, h.dtype, xp)
        if mask is not None:
            h *= mask
        self.ids, self.mask = ids, mask
        self.weight = wte.copy() if self.copy_weight else wte  # the tied head reads it
        self.head_grad = None
        return h

    def backward(self, p, g, dy, ctx, need_dx=True):
        ids, mask = self.ids, self.mask
        self.ids = self.mask = self.weight = None
        if mask is not None:
            dy = dy * mask
        gwte, gwpe = g["wte.weight"], g["wpe.weight"]
        if self.head_grad is not None:
            gwte[...] = self.head_grad  # the tied head's share of this slot's gradient
        else:
            gwte[...] = 0
        self.head_grad = None
        c = dy.shape[-1]
        scatter_add_rows(gwte, ids.reshape(-1), dy.reshape(-1, c))  # repeated ids add up
        t = dy.shape[1]
        gwpe[t:] = 0
        dy.sum(axis=0, out=gwpe[:t])
        return None  # token ids have no gradient


def scatter_add_rows(out, index, rows) -> None:
    """out[index[i]] += rows[i] for every i, repeated indices summed (NumPy's add.at; CuPy's
    where it has ufunc.at, else cupyx.scatter_add)."""
    xp = get_array_module(out)
    if hasattr(xp.add, "at"):
        xp.add.at(out, index, rows)
    else:
        import cupyx

        cupyx.scatter_add(out, index, rows)


class TiedHead(Layer):
    """(B, T, C) -> (B, T, V): LayerNorm ln_f (weight, bias (C,)), then logits h wte^T through
    the tied embedding's matrix (no matrix of its own)."""

    type = "tied_head"

    def __init__(self):
        self.embedding = None

    def output_shape(self, in_shape):
        if len(in_shape) != 2:
            self.fail(f"input shape {in_shape} is not (positions, features)")
        if self.embedding is not None and self.embedding.n_embd != in_shape[1]:
            self.fail(f"{in_shape[1]} features do not fit the tied embedding's "
                      f"{self.embedding.n_embd}")
        return (in_shape[0], self.vocab_size)

    @property
    def vocab_size(self) -> int:
        if self.embedding is None:
            self.fail("it is not tied to an embedding; build it inside a GPT model")
        return self.embedding.vocab_size

    def params(self):
        c = self.in_shape[-1]
        return [("ln_f.weight", (c,)), ("ln_f.bias", (c,))]

    def init(self, rng, p):
        p["ln_f.weight"][...] = 1.0

    def forward(self, p, x, ctx):
        h, self.ln = layernorm(x, p["ln_f.weight"], p["ln_f.bias"], EPS)  # (B, T, C)
        self.h = h
        return h @ self.embedding.weight.T  # (B, T, V)

    def backward(self, p, g, dy, ctx, need_dx=True):
        xp = get_array_module(dy)
        h, ln, wte = self.h, self.ln, self.embedding.weight
        self.h = self.ln = None
        v, c = wte.shape
        grad = xp.empty((v, c), dtype=dy.dtype)
        xp.matmul(dy.reshape(-1, v).T, h.reshape(-1, c), out=grad)  # (V, C)
        self.embedding.head_grad = grad
        dh = dy @ wte  # (B, T, C)
        return layernorm_backward(dh, p["ln_f.weight"], ln, g["ln_f.weight"], g["ln_f.bias"])


def tie(head: TiedHead, embedding: Embedding) -> None:
    """Make `head` read, and add its gradient into, `embedding`'s wte.weight."""
    if not isinstance(head, TiedHead) or not isinstance(embedding, Embedding):
        raise UserError("model.layers: a tied_head needs an embedding layer first")
    head.embedding = embedding
