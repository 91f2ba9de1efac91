"""`conv2d`: im2col by stride tricks, one GEMM; the input gradient by col2im.

Chainer's Convolution2DFunction and cs231n's fast_layers: the (B, C, H, W) input, padded, is
viewed (no copy) as (B, OH, OW, C, KH, KW) windows by `as_strided`; one reshape copies it into
the column matrix, and one GEMM with W (O, C*KH*KW) gives every output pixel. The backward's
col2im adds the column gradients back with one strided slice per kernel offset (KH*KW slices,
no loop over pixels). CuPy takes the same path (its cuDNN bindings are gone): im2col and cuBLAS.
"""

from __future__ import annotations

import numpy as np

from ...xp import get_array_module
from .base import Layer, need_rank, positive


def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a window sweep: floor((size + 2 pad - kernel) / stride) + 1."""
    return (size + 2 * pad - kernel) // stride + 1


def windows(x, kh: int, kw: int, stride: int, pad: int = 0):
    """Return a (B, C, OH, OW, KH, KW) strided view of x (B, C, H, W) padded by `pad` (no copy
    unless padding)."""
    xp = get_array_module(x)
    if pad:
        x = xp.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))  # (B, C, H+2p, W+2p)
    b, c, h, w = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sb, sc, sh, sw = x.strides
    return xp.lib.stride_tricks.as_strided(
        x, (b, c, oh, ow, kh, kw), (sb, sc, sh * stride, sw * stride, sh, sw))


def im2col(x, kh: int, kw: int, stride: int, pad: int):
    """Return the column matrix of x (B, C, H, W): (B*OH*OW, C*KH*KW), one row per pixel."""
    view = windows(x, kh, kw, stride, pad)  # (B, C, OH, OW, KH, KW)
    b, c, oh, ow = view.shape[:4]
    return view.transpose(0, 2, 3, 1, 4, 5).reshape(b * oh * ow, c * kh * kw)  # one copy


def col2im(dcol, shape, kh: int, kw: int, stride: int, pad: int):
    """Add the rows of dcol (B, OH, OW, C, KH, KW) back into an input-shaped (B, C, H, W) array:
    the adjoint of im2col, one strided slice per kernel offset."""
    xp = get_array_module(dcol)
    b, c, h, w = shape
    oh, ow = dcol.shape[1:3]
    dx = xp.zeros((b, c, h + 2 * pad, w + 2 * pad), dtype=dcol.dtype)  # padded
    d = dcol.transpose(0, 3, 4, 5, 1, 2)  # (B, C, KH, KW, OH, OW), a view
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += d[:, :, i, j]
    return dx[:, :, pad:pad + h, pad:pad + w] if pad else dx


class Conv2d(Layer):
    """(B, C, H, W) -> (B, O, OH, OW). W (O, C, KH, KW) as PyTorch's, He-normal; b (O,) zero."""

    type = "conv2d"

    def __init__(self, out: int, kernel: int, stride: int = 1, padding: int = 0,
                 in_channels: int | None = None):
        self.out = positive("conv2d", "out", out)
        self.kernel = positive("conv2d", "kernel", kernel)
        self.stride = positive("conv2d", "stride", stride)
        self.padding = positive("conv2d", "padding", padding, 0)
        self.in_channels = in_channels  # fixed when loaded from a file; else from the input

    def output_shape(self, in_shape):
        need_rank(self, in_shape, (3,), "(channels, height, width)")
        c, h, w = in_shape
        k, pad = self.kernel, self.padding
        if self.in_channels is not None and c != self.in_channels:
            self.fail(f"input shape {in_shape} has {c} channels; W of shape "
                      f"({self.out}, {self.in_channels}, {k}, {k}) takes {self.in_channels}")
        if k > h + 2 * pad or k > w + 2 * pad:
            self.fail(f"kernel ({k}, {k}) is larger than its input {in_shape}"
                      + (f" padded by {pad}" if pad else ""))
        self.in_channels = c  # W's shape is fixed from now on
        return (self.out, out_size(h, k, self.stride, pad), out_size(w, k, self.stride, pad))

    def params(self):
        k = self.kernel
        return [("W", (self.out, self.in_shape[0], k, k)), ("b", (self.out,))]

    def init(self, rng, p):
        fan_in = self.in_shape[0] * self.kernel ** 2
        p["W"][...] = rng.standard_normal(p["W"].shape) * np.sqrt(2.0 / fan_in)

    def settings(self):
        return {"out": self.out, "kernel": self.kernel, "stride": self.stride,
                "padding": self.padding}

    def forward(self, p, x, ctx):
        k, o = self.kernel, self.out
        _, oh, ow = self.out_shape
        self.batch = x.shape[0]
        self.col = im2col(x, k, k, self.stride, self.padding)  # (B*OH*OW, C*KH*KW)
        y = self.col @ p["W"].reshape(o, -1).T  # (B*OH*OW, O), the GEMM
        y += p["b"]
        return y.reshape(self.batch, oh, ow, o).transpose(0, 3, 1, 2)  # (B, O, OH, OW) view

    def backward(self, p, g, dy, ctx, need_dx=True):
        xp = get_array_module(dy)
        k, o = self.kernel, self.out
        dy2 = dy.transpose(0, 2, 3, 1).reshape(-1, o)  # (B*OH*OW, O)
        xp.matmul(dy2.T, self.col, out=g["W"].reshape(o, -1))  # (O, C*KH*KW) into the buffer
        dy2.sum(axis=0, out=g["b"])  # (O,)
        self.col = None
        if not need_dx:
            return None
        c = self.in_shape[0]
        _, oh, ow = self.out_shape
        dcol = dy2 @ p["W"].reshape(o, -1)  # (B*OH*OW, C*KH*KW)
        dcol = dcol.reshape(self.batch, oh, ow, c, k, k)
        return col2im(dcol, (self.batch, *self.in_shape), k, k, self.stride, self.padding)
