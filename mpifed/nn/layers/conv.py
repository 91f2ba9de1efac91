"""`conv2d`: im2col by stride tricks, one GEMM; the input gradient by col2im.

Chainer's Convolution2DFunction and Caffe's im2col, with the batch as the innermost axis
(cuda-convnet's CHWN): the input (B, C, H, W) is copied, padded, into a (C, Hp, Wp, B) buffer
that the layer keeps, viewed (no copy) by `as_strided` as (C, KH, KW, OH, OW, B) windows, and
one copy of the view gives the (C*KH*KW, OH*OW*B) column matrix; one GEMM with W
(O, C*KH*KW) gives every output pixel as (O, OH*OW*B). The output is returned as a
(B, O, OH, OW) view of that batch-last array, and element-wise layers and the pools keep the
layout, so the next layer reads it without a transpose copy. The backward's col2im adds the
column gradients back with one strided slice per kernel offset (KH*KW slices, no loop over
pixels).

Why batch-last: a window's pixels for the whole batch are runs of OW*B contiguous elements
(B = 64 floats apart per column), so the column copy and col2im move runs of hundreds of
elements where a batch-first layout moves rows of OW (10-28 on LeNet-5's images); the pools'
strided slices likewise run over the batch. On the host the output rows go through in chunks
whose columns fit in cache (COLUMN_BYTES), each copied and multiplied while hot; on a GPU in
one piece. Only xp operations: CuPy takes the same path (im2col and cuBLAS).

A stride-1 convolution that keeps the image size (padding (K-1)/2: a ResNet's 3x3 layers) runs
its backward from the columns of the output gradient instead (`_backward_same`): the input
gradient is a convolution of dy with the flipped kernel, and the weight gradient the product
of the same columns with the input, so both GEMMs run over K*K*O-long or pixel-long inner
products, where the column form's input-gradient GEMM has only O and then a col2im.
"""

from __future__ import annotations

import numpy as np

from ...xp import get_array_module
from .base import Layer, need_rank, positive, sum_into

COLUMN_BYTES = 4 << 20  # host column chunks: about one core's share of L2 cache
WHOLE_BYTES = 8 << 20  # host column matrices up to this size are built in one piece and kept


def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a window sweep: floor((size + 2 pad - kernel) / stride) + 1."""
    return (size + 2 * pad - kernel) // stride + 1


def windows(xt, kh: int, kw: int, stride: int):
    """Return a (C, KH, KW, OH, OW, B) strided view of xt (C, H, W, B) (any strides; no copy)."""
    xp = get_array_module(xt)
    c, h, w, b = xt.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sc, sh, sw, sb = xt.strides
    return xp.lib.stride_tricks.as_strided(
        xt, (c, kh, kw, oh, ow, b), (sc, sh, sw, sh * stride, sw * stride, sb))


def padded(xt, pad: int, out=None):
    """Return xt (C, H, W, B) with `pad` zeros around each image: written into `out`
    (C, H+2p, W+2p, B, its border already zero) when given; xt itself when pad is 0 and no
    `out` is given."""
    if not pad and out is None:
        return xt
    xp = get_array_module(xt)
    c, h, w, b = xt.shape
    if out is None:
        out = xp.zeros((c, h + 2 * pad, w + 2 * pad, b), dtype=xt.dtype)
    out[:, pad:pad + h, pad:pad + w] = xt
    return out


def copy_columns(view, out=None):
    """Copy a window view (C, KH, KW, ...) into `out` (flat, at least as large) or a new
    array; return it as the (C*KH*KW, ...) column matrix."""
    xp = get_array_module(view)
    if out is None:
        out = xp.empty(view.size, dtype=view.dtype)
    col = out[:view.size].reshape(view.shape)
    col[...] = view  # the one copy
    return col.reshape(view.shape[0] * view.shape[1] * view.shape[2], -1)


def add_columns(dcol, dxt, kh: int, kw: int, stride: int) -> None:
    """Add dcol (C*KH*KW, OH*OW*B) into the padded batch-last dxt (C, Hp, Wp, B) where
    `windows` read it: one strided slice per kernel offset."""
    c, hp, wp, b = dxt.shape
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    d = dcol.reshape(c, kh, kw, oh, ow, b)
    for i in range(kh):
        for j in range(kw):
            dxt[:, i:i + stride * oh:stride, j:j + stride * ow:stride] += d[:, i, j]


def im2col(x, kh: int, kw: int, stride: int, pad: int):
    """Return the column matrix of x (B, C, H, W): (C*KH*KW, OH*OW*B), one column per pixel."""
    return copy_columns(windows(padded(x.transpose(1, 2, 3, 0), pad), kh, kw, stride))


def col2im(dcol, shape, kh: int, kw: int, stride: int, pad: int):
    """Add the columns of dcol (C*KH*KW, OH*OW*B) back into an input-shaped (B, C, H, W)
    array: the adjoint of im2col."""
    xp = get_array_module(dcol)
    b, c, h, w = shape
    dxt = xp.zeros((c, h + 2 * pad, w + 2 * pad, b), dtype=dcol.dtype)  # padded, batch-last
    add_columns(dcol, dxt, kh, kw, stride)
    return dxt[:, pad:pad + h, pad:pad + w].transpose(3, 0, 1, 2)  # (B, C, H, W) view


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

    def _chunk(self, xp, batch: int, itemsize: int, channels: int | None = None) -> int:
        """Output rows per column chunk: on the host, all when the column matrix is small
        (WHOLE_BYTES), else as many as keep a chunk's columns within COLUMN_BYTES (they stay in
        cache between their copy and their GEMMs); on a GPU, all. channels: the columns'
        channels (the input's; the output's for the backward of a `same` convolution)."""
        _, oh, ow = self.out_shape
        if xp is not np:
            return oh
        channels = self.in_shape[0] if channels is None else channels
        per_row = channels * self.kernel ** 2 * ow * batch * itemsize
        if per_row * oh <= WHOLE_BYTES:
            return oh
        return max(1, min(oh, COLUMN_BYTES // per_row))

    def _same(self) -> bool:
        """Stride 1 and padding (K-1)/2 (the output has the input's size) and at most twice
        the input's channels out: then the backward runs as two forward-shaped GEMMs over the
        output gradient's columns, which are no more than twice the input's."""
        return (self.stride == 1 and 2 * self.padding == self.kernel - 1
                and self.out <= 2 * self.in_shape[0])

    def _columns(self, xt, lo: int, hi: int, out):
        """The column matrix (C*KH*KW, (hi-lo)*OW*B) of output rows lo..hi of the padded
        batch-last images xt (C, Hp, Wp, B)."""
        k, s = self.kernel, self.stride
        return copy_columns(windows(xt[:, lo * s:(hi - 1) * s + k], k, k, s), out)

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        k, o, pad = self.kernel, self.out, self.padding
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        b = self.batch = x.shape[0]
        buf = None
        if pad:
            buf = self.scratch("pad", (c, h + 2 * pad, w + 2 * pad, b), x.dtype, xp, zeroed=True)
        xt = padded(x.transpose(1, 2, 3, 0), pad, buf)  # (C, Hp, Wp, B)
        n = self._chunk(xp, b, x.dtype.itemsize)
        store = self.scratch("col", (c * k * k * n * ow * b,), x.dtype, xp)
        w2 = p["W"].reshape(o, -1)  # (O, C*KH*KW)
        bias = p["b"][:, None]  # (O, 1)
        y = xp.empty((o, oh * ow * b), dtype=x.dtype)
        row = ow * b  # columns per output row
        for lo in range(0, oh, n):
            hi = min(oh, lo + n)
            col = self._columns(xt, lo, hi, store)  # (C*KH*KW, (hi-lo)*OW*B)
            part = y[:, lo * row:hi * row]  # (O, (hi-lo)*OW*B)
            xp.matmul(w2, col, out=part)  # the GEMM
            part += bias  # while the chunk is in cache
        # backward needs the input (a `same` convolution's) or the columns (kept when one
        # chunk held them all, else rebuilt from xt)
        self.x = x if self._same() else None  # the `same` backward's input, when it applies
        self.xt, self.col = xt, (col if n >= oh else None)
        return y.reshape(o, oh, ow, b).transpose(3, 0, 1, 2)  # (B, O, OH, OW) view

    def backward(self, p, g, dy, ctx, need_dx=True):
        xp = get_array_module(dy)
        o = self.out
        dy2 = dy.transpose(1, 2, 3, 0).reshape(o, -1)  # (O, OH*OW*B), a view if batch-last
        sum_into(dy2, 1, g["b"])  # (O,), in float32 for half-precision dy
        if need_dx and self.x is not None and dy.dtype.itemsize >= 4:  # half: columns, f32 sums
            dx = self._backward_same(p, g, dy, xp)
        else:
            dx = self._backward_columns(p, g, dy2, xp, need_dx)
        self.x = self.xt = self.col = None
        return dx

    def _backward_same(self, p, g, dy, xp):
        """The backward of a stride-1 `same` convolution from the columns of dy padded by
        q = K-1-pad (the transposed convolution is a convolution with the flipped kernel):

            dx (C, H*W*B)    = W' (C, O*K*K) @ dcol (O*K*K, H*W*B),  W'[c, o,i,j] = W[o,c,K-1-i,K-1-j]
            G  (O*K*K, C)    = dcol @ x^T,                            dW[o,c,i,j] = G[o,K-1-i,K-1-j, c]

        Both products have K = O*K*K or the pixel count as their inner length (the column
        form's dx product has only O), and no col2im: dx comes out batch-last in one piece."""
        k, o = self.kernel, self.out
        c, h, w = self.in_shape
        b, q = self.batch, self.kernel - 1 - self.padding
        x, dtype = self.x.transpose(1, 2, 3, 0), dy.dtype  # (C, H, W, B)
        buf = self.scratch("dpad", (o, h + 2 * q, w + 2 * q, b), dtype, xp, zeroed=True)
        dyt = padded(dy.transpose(1, 2, 3, 0), q, buf)  # (O, H+2q, W+2q, B)
        wflip = p["W"][:, :, ::-1, ::-1].transpose(1, 0, 2, 3).reshape(c, -1)  # (C, O*K*K)
        n = self._chunk(xp, b, dtype.itemsize, o)
        store = self.scratch("col", (o * k * k * n * w * b,), dtype, xp)
        dx = xp.empty((c, h * w * b), dtype=dtype)
        gk = None
        row = w * b
        for lo in range(0, h, n):
            hi = min(h, lo + n)
            col = copy_columns(windows(dyt[:, lo:hi - 1 + k], k, k, 1), store)  # (O*K*K, n*W*B)
            xp.matmul(wflip, col, out=dx[:, lo * row:hi * row])
            part = xp.matmul(col, x[:, lo:hi].reshape(c, -1).T)  # (O*K*K, C)
            gk = part if gk is None else xp.add(gk, part, out=gk)
        g["W"][...] = gk.reshape(o, k, k, c)[:, ::-1, ::-1].transpose(0, 3, 1, 2)
        return dx.reshape(c, h, w, b).transpose(3, 0, 1, 2)  # (B, C, H, W) view

    def _backward_columns(self, p, g, dy2, xp, need_dx):
        """The backward from the input's columns (kept or rebuilt): dW = dy2 @ col^T, and dx
        by col2im of W^T @ dy2 (any stride and padding)."""
        k, o, pad, s = self.kernel, self.out, self.padding, self.stride
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        b = self.batch
        xt, col = self.xt, self.col
        gw, w2 = g["W"].reshape(o, -1), p["W"].reshape(o, -1)  # (O, C*KH*KW)
        dxt = xp.zeros((c, h + 2 * pad, w + 2 * pad, b), dtype=dy2.dtype) if need_dx else None
        n = oh if col is not None else self._chunk(xp, b, dy2.dtype.itemsize)
        store = None if col is not None else self.scratch(
            "col", (c * k * k * n * ow * b,), dy2.dtype, xp)
        row = ow * b
        for lo in range(0, oh, n):
            hi = min(oh, lo + n)
            if col is None or lo > 0:
                col = self._columns(xt, lo, hi, store)  # (C*KH*KW, (hi-lo)*OW*B), rebuilt
            part = dy2[:, lo * row:hi * row]  # (O, (hi-lo)*OW*B)
            # (C*KH*KW, O) then transposed: the long pixel axis as BLAS's inner product runs
            # faster this way round (OpenBLAS, 25-35% on these shapes)
            if lo == 0:
                gw[...] = xp.matmul(col, part.T).T  # into the flat gradient buffer
            else:
                gw += xp.matmul(col, part.T).T
            if need_dx:
                dcol = xp.matmul(w2.T, part, out=col)  # (C*KH*KW, (hi-lo)*OW*B), in place
                add_columns(dcol, dxt[:, lo * s:(hi - 1) * s + k], k, k, s)
        if not need_dx:
            return None
        return dxt[:, pad:pad + h, pad:pad + w].transpose(3, 0, 1, 2)  # (B, C, H, W) view
