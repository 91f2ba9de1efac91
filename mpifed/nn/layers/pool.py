"""`maxpool2d`, `avgpool2d` (kernel, stride = kernel, no padding) and `global_avgpool`."""

from __future__ import annotations

from ...xp import get_array_module
from .base import Layer, need_rank, positive
from .conv import out_size, windows


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
        """Yield (i, j, slice_h, slice_w): the input pixels under kernel offset (i, j)."""
        _, oh, ow = self.out_shape
        s = self.stride
        for i in range(self.kernel):
            for j in range(self.kernel):
                yield i, j, slice(i, i + s * oh, s), slice(j, j + s * ow, s)


class MaxPool2d(_Pool2d):
    """The window maximum; its gradient goes to the first maximal element of each window."""

    type = "maxpool2d"

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        k = self.kernel
        view = windows(x, k, k, self.stride)  # (B, C, OH, OW, KH, KW)
        flat = view.reshape(*view.shape[:4], k * k)  # (B, C, OH, OW, K*K), a copy
        self.arg = flat.argmax(axis=-1)  # (B, C, OH, OW)
        self.batch_shape = x.shape
        return xp.take_along_axis(flat, self.arg[..., None], axis=-1)[..., 0]

    def backward(self, p, g, dy, ctx, need_dx=True):
        if not need_dx:
            return None
        xp = get_array_module(dy)
        dx = xp.zeros(self.batch_shape, dtype=dy.dtype)  # (B, C, H, W)
        for i, j, rows, cols in self._offsets():
            dx[:, :, rows, cols] += dy * (self.arg == i * self.kernel + j)
        self.arg = None
        return dx


class AvgPool2d(_Pool2d):
    type = "avgpool2d"

    def forward(self, p, x, ctx):
        k = self.kernel
        self.batch_shape = x.shape
        return windows(x, k, k, self.stride).mean(axis=(4, 5))  # (B, C, OH, OW)

    def backward(self, p, g, dy, ctx, need_dx=True):
        if not need_dx:
            return None
        xp = get_array_module(dy)
        dx = xp.zeros(self.batch_shape, dtype=dy.dtype)  # (B, C, H, W)
        share = dy / dy.dtype.type(self.kernel ** 2)  # (B, C, OH, OW)
        for _, _, rows, cols in self._offsets():
            dx[:, :, rows, cols] += share
        return dx


class GlobalAvgPool(Layer):
    """(B, C, H, W) -> (B, C): the mean over each channel's pixels."""

    type = "global_avgpool"

    def output_shape(self, in_shape):
        need_rank(self, in_shape, (3,), "(channels, height, width)")
        return (in_shape[0],)

    def forward(self, p, x, ctx):
        return x.mean(axis=(2, 3))

    def backward(self, p, g, dy, ctx, need_dx=True):
        if not need_dx:
            return None
        xp = get_array_module(dy)
        c, h, w = self.in_shape
        scaled = dy / dy.dtype.type(h * w)  # (B, C)
        return xp.repeat(scaled[:, :, None], h * w, axis=2).reshape(dy.shape[0], c, h, w)
