"""`maxpool2d`, `avgpool2d` (kernel, stride = kernel, no padding) and `global_avgpool`."""

from __future__ import annotations

from ...xp import get_array_module
from .base import Layer, acc_sum, need_rank, positive
from .conv import out_size


class _Pool2d(Layer):
    def __init__(self, kernel: int, stride: int | None = None):
        self.kernel = positive(self.type, "kernel", kernel)
        self.stride = positive(self.type, "stride", kernel if stride is None else stride)

    def settings(self):
        return {"kernel": self.kernel, "stride": self.stride}

    def output_shape(self, in_shape):
        need_rank(self, in_shape, (3,), "(channels, height, width)")
        c, h, w = in_shape
        k = self.kernel
        if k > h or k > w:
            self.fail(f"kernel ({k}, {k}) is larger than its input {in_shape}")
        return (c, out_size(h, k, self.stride, 0), out_size(w, k, self.stride, 0))

    def _offsets(self):
        """Yield (index i * k + j, slice_h, slice_w): the input pixels under kernel offset
        (i, j), in row-major order (slices of a batch-last (C, H, W, B) view)."""
        _, oh, ow = self.out_shape
        s, k = self.stride, self.kernel
        for i in range(k):
            for j in range(k):
                yield i * k + j, slice(i, i + s * oh, s), slice(j, j + s * ow, s)

    def _input_gradient(self, xp, dtype):
        """A zeroed (B, C, H, W) array laid out batch-last, and its (C, H, W, B) view."""
        c, h, w = self.in_shape
        dxt = xp.zeros((c, h, w, self.batch), dtype=dtype)
        return dxt.transpose(3, 0, 1, 2), dxt


class MaxPool2d(_Pool2d):
    """The window maximum; its gradient goes to the first maximal element of each window.

    One strided slice per kernel offset (KH*KW of them, no loop over pixels), batch-last
    (C, H, W, B) as the convolutions leave their outputs, so each slice runs over the batch.
    Forward keeps the offset of each window's maximum (int8), so backward routes dy without
    a search.
    """

    type = "maxpool2d"

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        xt = x.transpose(1, 2, 3, 0)  # (C, H, W, B), a view
        offsets = self._offsets()
        _, rows, cols = next(offsets)
        best = xt[:, rows, cols].copy()  # (C, OH, OW, B), the running maximum
        arg = xp.zeros(best.shape, dtype=xp.int8)  # the offset that holds it
        for index, rows, cols in offsets:
            here = xt[:, rows, cols]
            better = here > best  # strict: ties keep the first maximal element
            xp.maximum(best, here, out=best)
            # offsets come in increasing order, so the latest better one is the largest
            xp.maximum(arg, better * xp.int8(index), out=arg)
        self.arg, self.batch = arg, x.shape[0]
        return best.transpose(3, 0, 1, 2)  # (B, C, OH, OW) view

    def backward(self, p, g, dy, ctx, need_dx=True):
        arg, self.arg = self.arg, None
        if not need_dx:
            return None
        xp = get_array_module(dy)
        dx, dxt = self._input_gradient(xp, dy.dtype)
        dyt = dy.transpose(1, 2, 3, 0)  # (C, OH, OW, B)
        disjoint = self.stride >= self.kernel
        for index, rows, cols in self._offsets():
            if disjoint:  # each input pixel under one window: write, no sum
                xp.multiply(dyt, arg == index, out=dxt[:, rows, cols])
            else:
                dxt[:, rows, cols] += dyt * (arg == index)
        return dx


class AvgPool2d(_Pool2d):
    type = "avgpool2d"

    def forward(self, p, x, ctx):
        xt = x.transpose(1, 2, 3, 0)  # (C, H, W, B), a view
        offsets = self._offsets()
        _, rows, cols = next(offsets)
        total = xt[:, rows, cols].copy()  # (C, OH, OW, B)
        for _, rows, cols in offsets:
            total += xt[:, rows, cols]
        total *= x.dtype.type(1 / self.kernel ** 2)
        self.batch = x.shape[0]
        return total.transpose(3, 0, 1, 2)  # (B, C, OH, OW) view

    def backward(self, p, g, dy, ctx, need_dx=True):
        if not need_dx:
            return None
        xp = get_array_module(dy)
        dx, dxt = self._input_gradient(xp, dy.dtype)
        share = dy.transpose(1, 2, 3, 0) * dy.dtype.type(1 / self.kernel ** 2)  # (C, OH, OW, B)
        for _, rows, cols in self._offsets():
            dxt[:, rows, cols] += share
        return dx


class GlobalAvgPool(Layer):
    """(B, C, H, W) -> (B, C): the mean over each channel's pixels."""

    type = "global_avgpool"

    def output_shape(self, in_shape):
        need_rank(self, in_shape, (3,), "(channels, height, width)")
        return (in_shape[0],)

    def forward(self, p, x, ctx):
        if x.dtype.itemsize < 4:  # half precision: the mean accumulates in float32
            return (acc_sum(x, (2, 3)) / (x.shape[2] * x.shape[3])).astype(x.dtype)
        return x.mean(axis=(2, 3))

    def backward(self, p, g, dy, ctx, need_dx=True):
        if not need_dx:
            return None
        xp = get_array_module(dy)
        c, h, w = self.in_shape
        scaled = dy / dy.dtype.type(h * w)  # (B, C)
        return xp.repeat(scaled[:, :, None], h * w, axis=2).reshape(dy.shape[0], c, h, w)
