"""`conv2d`: im2col by stride tricks, one GEMM; the input gradient by col2im.

Chainer's Convolution2DFunction and Caffe's im2col, channel-major: the input (B, C, H, W) is
copied, padded, into a (C, B, Hp, Wp) buffer that the layer keeps, viewed (no copy) by
`as_strided` as (C, KH, KW, B, OH, OW) windows, and one copy of the view gives the
(C*KH*KW, B*OH*OW) column matrix; one GEMM with W (O, C*KH*KW) gives every output pixel as
(O, B*OH*OW). The output is returned as a (B, O, OH, OW) view of that channel-major array, and
element-wise layers keep the layout, so the next layer reads it without a transpose copy. The
backward's col2im adds the column gradients back with one strided slice per kernel offset
(KH*KW slices, no loop over pixels).

Stride 1 on wide images reads rows whole (the flat trick): with the output computed on the
padded width Wp (OW real columns, Wp - OW discarded), window (i, j) of an image is one
contiguous run of OH*Wp elements starting at i*Wp + j, so the column copy and col2im move long
runs instead of rows of OW. On the host the batch goes through in chunks whose columns fit in
cache (COLUMN_BYTES), each copied and multiplied while hot; on a GPU in one piece. Only xp
operations: CuPy takes the same path (im2col and cuBLAS).
"""

from __future__ import annotations

import numpy as np

from ...xp import get_array_module
from .base import Layer, need_rank, positive

COLUMN_BYTES = 4 << 20  # host column chunks: about one core's share of L2 cache
WHOLE_BYTES = 8 << 20  # host column matrices up to this size are built in one piece and kept
FLAT_WASTE = 10  # the flat trick when the discarded columns (KW-1) are at most 1/10 of Wp


def out_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Output length of a window sweep: floor((size + 2 pad - kernel) / stride) + 1."""
    return (size + 2 * pad - kernel) // stride + 1


def windows(xt, kh: int, kw: int, stride: int):
    """Return a (C, KH, KW, B, OH, OW) strided view of xt (C, B, H, W) (any strides; no copy)."""
    xp = get_array_module(xt)
    c, b, h, w = xt.shape
    oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
    sc, sb, sh, sw = xt.strides
    return xp.lib.stride_tricks.as_strided(
        xt, (c, kh, kw, b, oh, ow), (sc, sh, sw, sb, sh * stride, sw * stride))


def flat_windows(xt, kh: int, kw: int, oh: int):
    """Return a (C, KH, KW, B, OH*Wp) view of a row-contiguous xt (C, B, Hp, Wp), stride 1:
    window (i, j) of an image is the run of OH*Wp elements from i*Wp + j (the last KW-1 of a
    row's Wp columns are not outputs). xt needs a spare row below the image for the last run."""
    xp = get_array_module(xt)
    c, b, _, wp = xt.shape
    sc, sb, sh, sw = xt.strides
    return xp.lib.stride_tricks.as_strided(xt, (c, kh, kw, b, oh * wp), (sc, sh, sw, sb, sw))


def padded(x, pad: int, out=None):
    """Return x (C, B, H, W) with `pad` zeros around each image: written into `out`
    (C, B, >= H+2p, W+2p, its border already zero) when given; x itself when pad is 0 and no
    `out` is given."""
    if not pad and out is None:
        return x
    xp = get_array_module(x)
    c, b, h, w = x.shape
    if out is None:
        out = xp.zeros((c, b, h + 2 * pad, w + 2 * pad), dtype=x.dtype)
    out[:, :, pad:pad + h, pad:pad + w] = x
    return out


def copy_columns(view, out=None):
    """Copy a window view (C, KH, KW, B, ...) into `out` (flat, at least as large) or a new
    array; return it as the (C*KH*KW, B*...) column matrix."""
    xp = get_array_module(view)
    if out is None:
        out = xp.empty(view.size, dtype=view.dtype)
    col = out[:view.size].reshape(view.shape)
    col[...] = view  # the one copy
    return col.reshape(view.shape[0] * view.shape[1] * view.shape[2], -1)


def add_columns(dcol, dxt, kh: int, kw: int, stride: int) -> None:
    """Add dcol (C*KH*KW, B*OH*OW) into the padded channel-major dxt (C, B, Hp, Wp) where
    `windows` read it: one strided slice per kernel offset."""
    c, b, hp, wp = dxt.shape
    oh, ow = (hp - kh) // stride + 1, (wp - kw) // stride + 1
    d = dcol.reshape(c, kh, kw, b, oh, ow)
    for i in range(kh):
        for j in range(kw):
            dxt[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride] += d[:, i, j]


def add_flat_columns(dcol, dxt, kh: int, kw: int, oh: int) -> None:
    """The adjoint of `flat_windows`: add dcol (C*KH*KW, B*OH*Wp) into dxt (C, B, Hp, Wp),
    rows contiguous, one run per kernel offset. Columns that are not outputs must be zero."""
    c, b, hp, wp = dxt.shape
    flat = dxt.reshape(c, b, hp * wp)  # a view: each image's rows are contiguous
    d = dcol.reshape(c, kh, kw, b, oh * wp)
    for i in range(kh):
        for j in range(kw):
            flat[:, :, i * wp + j:i * wp + j + oh * wp] += d[:, i, j]


def im2col(x, kh: int, kw: int, stride: int, pad: int):
    """Return the column matrix of x (B, C, H, W): (C*KH*KW, B*OH*OW), one column per pixel."""
    return copy_columns(windows(padded(x.transpose(1, 0, 2, 3), pad), kh, kw, stride))


def col2im(dcol, shape, kh: int, kw: int, stride: int, pad: int):
    """Add the columns of dcol (C*KH*KW, B*OH*OW) back into an input-shaped (B, C, H, W)
    array: the adjoint of im2col."""
    xp = get_array_module(dcol)
    b, c, h, w = shape
    dxt = xp.zeros((c, b, h + 2 * pad, w + 2 * pad), dtype=dcol.dtype)  # padded, channel-major
    add_columns(dcol, dxt, kh, kw, stride)
    return dxt[:, :, pad:pad + h, pad:pad + w].transpose(1, 0, 2, 3)  # (B, C, H, W) view


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
        self.flat = self.stride == 1 and (k - 1) * FLAT_WASTE <= w + 2 * pad
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

    def _geometry(self):
        """(rows, cols, width): the padded buffer's rows and columns per image, and the
        columns per output row that the GEMM computes (cols under the flat trick, else OW)."""
        c, h, w = self.in_shape
        _, _, ow = self.out_shape
        pad, flat = self.padding, self.flat
        cols = w + 2 * pad
        return h + 2 * pad + flat, cols, cols if flat else ow

    def _chunk(self, xp, batch: int, itemsize: int) -> int:
        """Images per column chunk: on the host, all when the column matrix is small
        (WHOLE_BYTES), else as many as keep a chunk's columns within COLUMN_BYTES (they stay in
        cache between their copy and their GEMM, and backward rebuilds them); on a GPU, all."""
        if xp is not np:
            return batch
        _, oh, _ = self.out_shape
        per_image = self.in_shape[0] * self.kernel ** 2 * oh * self._geometry()[2] * itemsize
        if per_image * batch <= WHOLE_BYTES:
            return batch
        return max(1, min(batch, COLUMN_BYTES // per_image))

    def _columns(self, xt, out):
        """The column matrix (C*KH*KW, n*OH*width) of the padded images xt (C, n, rows, cols)."""
        k, (_, oh, _) = self.kernel, self.out_shape
        view = flat_windows(xt, k, k, oh) if self.flat else windows(xt, k, k, self.stride)
        return copy_columns(view, out)

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        k, o, pad = self.kernel, self.out, self.padding
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        rows, cols, width = self._geometry()
        b = self.batch = x.shape[0]
        buf = None
        if pad or self.flat:  # the flat trick reads rows from the kept buffer
            buf = self.scratch("pad", (c, b, rows, cols), x.dtype, xp, zeroed=True)
        xt = padded(x.transpose(1, 0, 2, 3), pad, buf)  # (C, B, rows, cols)
        n = self._chunk(xp, b, x.dtype.itemsize)
        store = self.scratch("col", (c * k * k * n * oh * width,), x.dtype, xp)
        w2 = p["W"].reshape(o, -1)  # (O, C*KH*KW)
        y = xp.empty((o, b * oh * width), dtype=x.dtype)
        for lo in range(0, b, n):
            hi = min(b, lo + n)
            col = self._columns(xt[:, lo:hi], store)  # (C*KH*KW, n*OH*width)
            xp.matmul(w2, col, out=y[:, lo * oh * width:hi * oh * width])  # the GEMM
        y += p["b"][:, None]
        # backward needs the columns: kept when one chunk held them all, else rebuilt from xt
        self.xt, self.col = xt, (col if n >= b else None)
        y = y.reshape(o, b, oh, width)[:, :, :, :ow]  # (O, B, OH, OW)
        return y.transpose(1, 0, 2, 3)  # (B, O, OH, OW) view

    def backward(self, p, g, dy, ctx, need_dx=True):
        xp = get_array_module(dy)
        k, o, pad = self.kernel, self.out, self.padding
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        rows, cols, width = self._geometry()
        b = self.batch
        xt, col, self.xt, self.col = self.xt, self.col, None, None
        if width == ow:
            dy2 = dy.transpose(1, 0, 2, 3).reshape(o, -1)  # (O, B*OH*OW), a view if channel-major
        else:  # zeros in the columns that are not outputs, so they add nothing
            wide = self.scratch("dy", (o, b, oh, width), dy.dtype, xp, zeroed=True)
            wide[:, :, :, :ow] = dy.transpose(1, 0, 2, 3)
            dy2 = wide.reshape(o, -1)  # (O, B*OH*width)
        dy2.sum(axis=1, out=g["b"])  # (O,)
        gw, w2 = g["W"].reshape(o, -1), p["W"].reshape(o, -1)  # (O, C*KH*KW)
        dxt = xp.zeros((c, b, rows, cols), dtype=dy.dtype) if need_dx else None
        n = b if col is not None else self._chunk(xp, b, dy.dtype.itemsize)
        store = None if col is not None else self.scratch(
            "col", (c * k * k * n * oh * width,), dy.dtype, xp)
        for lo in range(0, b, n):
            hi = min(b, lo + n)
            if col is None or lo > 0:
                col = self._columns(xt[:, lo:hi], store)  # (C*KH*KW, n*OH*width), rebuilt
            part = dy2[:, lo * oh * width:hi * oh * width]  # (O, n*OH*width)
            # (C*KH*KW, O) then transposed: the long pixel axis as BLAS's inner product runs
            # faster this way round (OpenBLAS, 25-35% on these shapes)
            if lo == 0:
                gw[...] = xp.matmul(col, part.T).T  # into the flat gradient buffer
            else:
                gw += xp.matmul(col, part.T).T
            if need_dx:
                dcol = xp.matmul(w2.T, part, out=col)  # (C*KH*KW, n*OH*width), in place
                if self.flat:
                    add_flat_columns(dcol, dxt[:, lo:hi], k, k, oh)
                else:
                    add_columns(dcol, dxt[:, lo:hi], k, k, self.stride)
        if not need_dx:
            return None
        return dxt[:, :, pad:pad + h, pad:pad + w].transpose(1, 0, 2, 3)  # (B, C, H, W) view
