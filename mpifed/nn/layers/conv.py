"""`conv2d`: im2col by stride tricks, one GEMM; the input gradient by col2im.

Chainer's Convolution2DFunction and Caffe's im2col, channel-major: the input (B, C, H, W),
padded, is viewed (no copy) by `as_strided` as (C, KH, KW, B, OH, OW) windows; one copy into a
column buffer kept by the layer gives the (C*KH*KW, B*OH*OW) matrix, and one GEMM with
W (O, C*KH*KW) gives every output pixel as (O, B*OH*OW). The output is returned as a
(B, O, OH, OW) view of that channel-major array, and element-wise layers keep the layout, so
the next convolution's windows and this one's backward read it without a transpose copy.
The backward's col2im adds the column gradients back with one strided slice per kernel offset
(KH*KW slices, no loop over pixels). Only xp operations: CuPy takes the same path (im2col and
cuBLAS).
"""

from __future__ import annotations

import numpy as np

from ...xp import get_array_module
from .base import Layer, need_rank, positive


def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a window sweep: floor((size + 2 pad - kernel) / stride) + 1."""
    return (size + 2 * pad - kernel) // stride + 1


def windows(x, kh: int, kw: int, stride: int):
    """Return a (C, KH, KW, B, OH, OW) strided view of x (C, B, H, W) (any strides; no copy)."""
    xp = get_array_module(x)
    c, b, h, w = x.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sc, sb, sh, sw = x.strides
    return xp.lib.stride_tricks.as_strided(
        x, (c, kh, kw, b, oh, ow), (sc, sh, sw, sb, sh * stride, sw * stride))


def padded(x, pad: int, out=None):
    """Return x (C, B, H, W) with `pad` zeros around each image: written into `out`
    (C, B, H+2p, W+2p, its border already zero) when given; x itself when pad is 0."""
    if not pad:
        return x
    xp = get_array_module(x)
    c, b, h, w = x.shape
    if out is None:
        out = xp.zeros((c, b, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    out[:, :, pad:pad + h, pad:pad + w] = x
    return out


def im2col(x, kh: int, kw: int, stride: int, pad: int, out=None, pad_out=None):
    """Return the column matrix of x (B, C, H, W): (C*KH*KW, B*OH*OW), one column per pixel.

    out: a (C, KH, KW, B, OH, OW) buffer to fill (else a new one); pad_out: the padded
    input's buffer (see `padded`).
    """
    xp = get_array_module(x)
    view = windows(padded(x.transpose(1, 0, 2, 3), pad, pad_out), kh, kw, stride)
    if out is None:
        out = xp.empty(view.shape, dtype=x.dtype)
    out[...] = view  # the one copy: (C, KH, KW, B, OH, OW)
    c, _, _, b, oh, ow = view.shape
    return out.reshape(c * kh * kw, b * oh * ow)


def col2im(dcol, shape, kh: int, kw: int, stride: int, pad: int):
    """Add the columns of dcol (C*KH*KW, B*OH*OW) back into an input-shaped (B, C, H, W)
    array: the adjoint of im2col, one strided slice per kernel offset."""
    xp = get_array_module(dcol)
    b, c, h, w = shape
    oh, ow = out_size(h, kh, stride, pad), out_size(w, kw, stride, pad)
    d = dcol.reshape(c, kh, kw, b, oh, ow)
    dx = xp.zeros((c, b, h + 2 * pad, w + 2 * pad), dtype=dcol.dtype)  # padded, channel-major
    for i in range(kh):
        for j in range(kw):
            dx[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += d[:, i, j]
    return dx[:, :, pad:pad + h, pad:pad + w].transpose(1, 0, 2, 3)  # (B, C, H, W) view


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
        xp = get_array_module(x)
        k, o, pad = self.kernel, self.out, self.padding
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        b = self.batch = x.shape[0]
        cols = self.scratch("col", (c, k, k, b, oh, ow), x.dtype, xp)
        pads = self.scratch("pad", (c, b, h + 2 * pad, w + 2 * pad), x.dtype, xp, zeroed=True) \
            if pad else None
        self.col = im2col(x, k, k, self.stride, pad, cols, pads)  # (C*KH*KW, B*OH*OW)
        y = xp.matmul(p["W"].reshape(o, -1), self.col)  # (O, B*OH*OW), the GEMM
        y += p["b"][:, None]
        return y.reshape(o, b, oh, ow).transpose(1, 0, 2, 3)  # (B, O, OH, OW) view

    def backward(self, p, g, dy, ctx, need_dx=True):
        xp = get_array_module(dy)
        o = self.out
        dy2 = dy.transpose(1, 0, 2, 3).reshape(o, -1)  # (O, B*OH*OW), a view if channel-major
        xp.matmul(dy2, self.col.T, out=g["W"].reshape(o, -1))  # (O, C*KH*KW) into the buffer
        dy2.sum(axis=1, out=g["b"])  # (O,)
        col, self.col = self.col, None
        if not need_dx:
            return None
        dcol = xp.matmul(p["W"].reshape(o, -1).T, dy2, out=col)  # (C*KH*KW, B*OH*OW), in place
        k = self.kernel
        return col2im(dcol, (self.batch, *self.in_shape), k, k, self.stride, self.padding)
