"""Forward and backward of the pieces a transformer block is made of, as pure functions.

Arrays are (..., features) with the features last, as PyTorch's nn.Linear and nn.LayerNorm see
them; weights are in PyTorch's [out, in] layout, so a GPT's arrays are its `state_dict` as is.
Each forward returns what its backward needs (a "cache"); backward functions write the
parameter gradients into the views they are given and return the input gradient.
"""

from __future__ import annotations

import math

import numpy as np

from ...xp import get_array_module


def linear(x, w, b):
    """y = x W^T + b for x (..., in), W (out, in), b (out,) -> (..., out)."""
    y = x @ w.T  # (..., out)
    y += b
    return y


def linear_backward(x, w, dy, gw, gb, need_dx=True):
    """Write dW (out, in) and db (out,) for y = x W^T + b; return dx (..., in) or None."""
    xp = get_array_module(dy)
    x2 = x.reshape(-1, x.shape[-1])  # (N, in)
    dy2 = dy.reshape(-1, dy.shape[-1])  # (N, out)
    xp.matmul(dy2.T, x2, out=gw)  # (out, in), straight into the flat buffer
    dy2.sum(axis=0, out=gb)
    return dy @ w if need_dx else None  # (..., in)


def layernorm(x, w, b, eps: float):
    """Normalise over the last axis (PyTorch's LayerNorm(features)); return (y, cache).

    Two temporaries of x's size (xhat, kept for backward, and y); the variance is a dot
    product per row (einsum), not a squared copy."""
    xp = get_array_module(x)
    f = x.dtype.type
    xhat = x - x.mean(axis=-1, keepdims=True)  # (..., C) centred, normalised in place below
    inv = xp.einsum("...i,...i->...", xhat, xhat)[..., None]  # (..., 1) sum of squares
    inv *= f(1 / x.shape[-1])
    inv += f(eps)
    xp.sqrt(inv, out=inv)
    xp.reciprocal(inv, out=inv)  # 1 / sqrt(var + eps)
    xhat *= inv
    y = xhat * w
    y += b
    return y, (xhat, inv)


def layernorm_backward(dy, w, cache, gw, gb):
    """Write dw, db (C,) of `layernorm`; return dx (..., C):
    dx = inv (dxhat - mean(dxhat) - xhat mean(dxhat xhat)), dxhat = dy w."""
    xp = get_array_module(dy)
    xhat, inv = cache
    c = dy.shape[-1]
    f = dy.dtype.type
    (dy * xhat).reshape(-1, c).sum(axis=0, out=gw)
    dy.reshape(-1, c).sum(axis=0, out=gb)
    dxhat = dy * w  # (..., C)
    proj = xp.einsum("...i,...i->...", dxhat, xhat)[..., None]  # (..., 1)
    proj *= f(1 / c)
    dx = xhat * proj
    xp.subtract(dxhat, dx, out=dx)
    dx -= dxhat.mean(axis=-1, keepdims=True)
    dx *= inv
    return dx


GELU_FORMS = ("tanh", "exact")  # model.gelu: GPT-2's tanh approximation, or x * Phi(x) exactly
_C = math.sqrt(2.0 / math.pi)


def gelu(x, form: str):
    """GELU of x in `form` ("tanh" or "exact"); return (y, cache).

    tanh: 0.5 x (1 + tanh(z)), z = C (x + 0.044715 x^3), computed as x sigmoid(2z) =
    x / (1 + exp(-2z)), the same function (0.5 (1 + tanh z) = sigmoid(2z)): one exp instead of
    tanh, which NumPy does not vectorise, in place on one temporary (a block's (B, T, 4C)
    activations, where temporaries cost more than the arithmetic). exp(-2z) overflows to inf
    for x below about -10, giving sigmoid 0 and y -0.0, as tanh's rounding to -1 does.
    The cache holds x and sigmoid(2z).
    """
    xp = get_array_module(x)
    f = x.dtype.type
    if form == "tanh":
        sig = x * x
        sig *= f(-2 * 0.044715 * _C)
        sig -= f(2 * _C)
        sig *= x  # -2z
        with np.errstate(over="ignore"):  # NumPy warns of the inf; CuPy never does
            xp.exp(sig, out=sig)
        sig += f(1)
        xp.reciprocal(sig, out=sig)  # sigmoid(2z)
        return x * sig, (x, sig)
    phi = (1 + erf(x * f(1 / math.sqrt(2.0)))) * f(0.5)  # Phi(x)
    return x * phi, (x, phi)


def gelu_backward(dy, cache, form: str):
    """Return dx of `gelu` from its cache.

    tanh: with s = sigmoid(2z), d/dx [x s] = s + 2 x s (1 - s) dz/dx, dz/dx = C (1 + 3 0.044715
    x^2) (as 0.5 (1 + tanh z) + 0.5 x (1 - tanh^2 z) dz/dx, since 1 - tanh^2 z = 4 s (1 - s)).
    """
    xp = get_array_module(dy)
    x, s = cache
    f = x.dtype.type
    if form == "tanh":
        g = x * x
        g *= f(3 * 0.044715 * _C)
        g += f(_C)
        g *= x  # x dz/dx
        w = f(1) - s
        w *= s  # s (1 - s)
        g *= w
        g *= f(2)
        g += s
        g *= dy
        return g
    pdf = xp.exp(f(-0.5) * x * x) * f(1 / math.sqrt(2 * math.pi))
    return dy * (s + x * pdf)


def erf(x):
    """The error function, element-wise: SciPy's (CuPy's) where installed, else Numerical
    Recipes' Chebyshev fit of erfc (fractional error below 1.2e-7: float32's precision)."""
    xp = get_array_module(x)
    try:
        if xp is np:
            from scipy.special import erf as special_erf
        else:
            from cupyx.scipy.special import erf as special_erf
        return special_erf(x).astype(x.dtype, copy=False)
    except ImportError:
        return _erf_fit(x)


_ERFC = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806, 0.27886807,
         -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def _erf_fit(x):
    """erf from Numerical Recipes' erfcc (Press et al. 2007, 6.2.2), in xp operations."""
    xp = get_array_module(x)
    z = xp.abs(x)
    t = 1 / (1 + 0.5 * z)
    poly = xp.zeros_like(t) + _ERFC[-1]
    for c in _ERFC[-2::-1]:
        poly = poly * t + c
    erfc = t * xp.exp(-z * z + poly)
    return xp.where(x >= 0, 1 - erfc, erfc - 1).astype(x.dtype, copy=False)


def dropout_mask(shape, p: float, ctx, salt: int, dtype, xp):
    """The scaled keep-mask (0 or 1/(1-p)) of dropout with probability p, or None when off.

    Drawn on the host from (run.seed, step, rank, salt), as the `dropout` layer's: the same on
    every backend, after a resume, and when a recomputed forward draws it again.
    """
    if not ctx.train or p == 0:
        return None
    rng = np.random.default_rng([ctx.seed, ctx.step, ctx.rank, salt])
    keep = rng.random(shape) >= p
    return xp.asarray(keep.astype(dtype) / np.dtype(dtype).type(1 - p))


def salt_of(where: str) -> int:
    """A stable 32-bit number naming a place in the model (seeds its dropout)."""
    return sum(ord(c) * 31 ** i for i, c in enumerate(where)) % (1 << 32)
