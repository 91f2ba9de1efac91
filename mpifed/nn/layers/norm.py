"""`layernorm` and `batchnorm2d` (optionally synchronised over the data-parallel ranks)."""

from __future__ import annotations

from ...errors import UserError
from ...xp import get_array_module
from .base import Layer, acc_sum, need_rank


def _eps(layer_type: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise UserError(f"{layer_type}.eps: expected a number > 0, got {eps!r}")
    return float(eps)


class LayerNorm(Layer):
    """Normalise each sample over all its axes; gamma and beta have the input's shape (as
    PyTorch's LayerNorm(normalized_shape=input shape))."""

    type = "layernorm"

    def __init__(self, eps: float = 1e-5):
        self.eps = _eps("layernorm", eps)

    def settings(self):
        return {"eps": self.eps}

    def params(self):
        return [("gamma", self.in_shape), ("beta", self.in_shape)]

    def init(self, rng, p):
        p["gamma"][...] = 1.0

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        axes = tuple(range(1, x.ndim))
        centered = x - x.mean(axis=axes, keepdims=True)  # (B, ...)
        var = (centered * centered).mean(axis=axes, keepdims=True)  # (B, 1, ...)
        self.inv = 1 / xp.sqrt(var + x.dtype.type(self.eps))
        self.xhat = centered * self.inv
        return self.xhat * p["gamma"] + p["beta"]

    def backward(self, p, g, dy, ctx, need_dx=True):
        xhat, inv = self.xhat, self.inv
        self.xhat = self.inv = None
        (dy * xhat).sum(axis=0, out=g["gamma"])
        dy.sum(axis=0, out=g["beta"])
        if not need_dx:
            return None
        axes = tuple(range(1, dy.ndim))
        dxhat = dy * p["gamma"]
        return inv * (dxhat - dxhat.mean(axis=axes, keepdims=True)
                      - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True))


class BatchNorm2d(Layer):
    """Per-channel batch normalisation of (B, C, H, W) (or (B, C)), as PyTorch's BatchNorm2d.

    Training normalises by the batch mean and biased variance; with `sync`, over the global batch
    of all data-parallel ranks (SyncBatchNorm: two small all-reduces forward, one backward).
    running_mean and running_var (unbiased) move by `momentum` each step and serve evaluation;
    they are buffers: backward writes their new values into the gradient buffer, the all-reduce
    averages them over the ranks, and the step copies them into the parameters.
    """

    type = "batchnorm2d"
    buffers = ("running_mean", "running_var")

    def __init__(self, sync: bool = False, momentum: float = 0.1, eps: float = 1e-5):
        if not isinstance(sync, bool):
            raise UserError(f"batchnorm2d.sync: expected true or false, got {sync!r}")
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) \
                or not 0 <= momentum <= 1:
            raise UserError(f"batchnorm2d.momentum: expected a number in [0, 1], got {momentum!r}")
        self.sync, self.momentum, self.eps = sync, float(momentum), _eps("batchnorm2d", eps)

    def settings(self):
        return {"sync": self.sync, "momentum": self.momentum, "eps": self.eps}

    def output_shape(self, in_shape):
        need_rank(self, in_shape, (1, 3), "(channels, height, width) or (channels,)")
        return in_shape

    def params(self):
        c = (self.in_shape[0],)
        return [("gamma", c), ("beta", c), ("running_mean", c), ("running_var", c)]

    def init(self, rng, p):
        p["gamma"][...] = 1.0
        p["running_var"][...] = 1.0

    def _rows(self, x):
        """x (B, C, H, W) or (B, C) as per-channel rows (C, B*H*W): a view when x is laid out
        batch-last ((C, H, W, B) in memory, as the convolutions leave it), else a copy."""
        xp = get_array_module(x)
        t = x.transpose(1, 2, 3, 0) if x.ndim == 4 else x.T  # (C, H, W, B) or (C, B)
        return xp.ascontiguousarray(t).reshape(x.shape[1], -1)

    def _shaped(self, rows, like):
        """Rows (C, M) back as an array shaped `like` (B, C, H, W) or (B, C), batch-last."""
        if like.ndim == 4:
            b, c, h, w = like.shape
            return rows.reshape(c, h, w, b).transpose(3, 0, 1, 2)
        return rows.T

    def _sum(self, parts, ctx):
        """Sum per-channel arrays (and counts) over the ranks when synchronised."""
        xp = get_array_module(parts[0])
        if not (self.sync and ctx.reduce):
            return parts
        sizes = [a.size for a in parts]
        total = ctx.reduce(xp.concatenate([a.reshape(-1) for a in parts]))
        out, lo = [], 0
        for a, n in zip(parts, sizes):
            out.append(total[lo:lo + n].reshape(a.shape))
            lo += n
        return out

    def forward(self, p, x, ctx):
        xp = get_array_module(x)
        rows = self._rows(x)  # (C, M), M = B*H*W
        if not ctx.train:
            inv = 1 / xp.sqrt(p["running_var"] + x.dtype.type(self.eps))  # (C,)
            scale = p["gamma"] * inv
            y = rows * scale[:, None]
            y += (p["beta"] - p["running_mean"] * scale)[:, None]
            return self._shaped(y, x)
        self.half = x.dtype.itemsize < 4  # fp16/bf16: statistics in float32 (fp16 overflows)
        if self.half:
            return self._forward_half(p, x, ctx)
        count = xp.asarray([rows.shape[1]], dtype=x.dtype)
        total, count = self._sum([rows.sum(axis=1), count], ctx)  # (C,), (1,)
        mean = total / count  # (C,)
        # the centred input, kept for backward in a working array: two passes (mean, then
        # the centred squares) keep the variance exact where the mean dwarfs the spread
        centered = self.scratch("centered", rows.shape, x.dtype, xp)
        xp.subtract(rows, mean[:, None], out=centered)  # (C, M)
        (square,) = self._sum([_row_dots(centered, centered)], ctx)  # (C,)
        var = square / count  # biased: normalises the batch
        inv = 1 / xp.sqrt(var + x.dtype.type(self.eps))  # (C,)
        self.n, self.inv, self.centered = count, inv, centered
        m = x.dtype.type(self.momentum)
        unbiased = square / xp.maximum(count - 1, 1)
        self.new_stats = ((1 - m) * p["running_mean"] + m * mean,
                          (1 - m) * p["running_var"] + m * unbiased)
        y = xp.multiply(centered, (p["gamma"] * inv)[:, None])  # (C, M), fresh
        y += p["beta"][:, None]
        return self._shaped(y, x)

    def backward(self, p, g, dy, ctx, need_dx=True):
        if getattr(self, "half", False):  # as the forward went (bf16 matmuls may return fp32 dy)
            return self._backward_half(p, g, dy, ctx, need_dx)
        xp = get_array_module(dy)
        centered, inv, n = self.centered, self.inv, self.n
        self.centered = self.inv = None
        g["running_mean"][...], g["running_var"][...] = self.new_stats
        rows = self._rows(dy)  # (C, M)
        dyc = _row_dots(rows, centered)  # (C,): sum of dy * (x - mean), this rank's share
        dyy = rows.sum(axis=1)  # (C,)
        g["gamma"][...] = dyc * inv  # sum of dy * xhat
        g["beta"][...] = dyy
        if not need_dx:
            return None
        dyc, dyy = self._sum([dyc, dyy], ctx)  # the global batch's sums when synchronised
        # dx = gamma inv (dy - mean(dy) - xhat mean(dy xhat)), xhat = centered inv:
        #    = a dy + b centered + c per channel, two passes over (C, M)
        a = p["gamma"] * inv  # (C,)
        b = -a * inv * inv * dyc / n
        c = -a * dyy / n
        dx = xp.multiply(centered, b[:, None])  # (C, M), fresh
        dx += c[:, None]
        dx += rows * a[:, None]
        return self._shaped(dx, dy)


    def _forward_half(self, p, x, ctx):
        """Training forward of half-precision x (mixed precision; correctness on CPU): the
        sums in float32 (`acc_sum`), the normalised x in x's dtype."""
        xp = get_array_module(x)
        axes = (0, 2, 3) if x.ndim == 4 else (0,)
        shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        total = acc_sum(x, axes)  # (C,) float32
        count = xp.asarray([x.size // x.shape[1]], dtype=total.dtype)
        total, count = self._sum([total, count], ctx)  # (C,), (1,)
        mean = total / count  # (C,)
        centered = x - mean.astype(x.dtype, copy=False).reshape(shape)  # (B, C, H, W)
        (square,) = self._sum([acc_sum(centered * centered, axes)], ctx)  # (C,)
        var = square / count  # biased: normalises the batch
        self.n = count
        inv = 1 / xp.sqrt(var + var.dtype.type(self.eps))  # (C,)
        self.inv = inv.astype(x.dtype, copy=False).reshape(shape)  # (1, C, 1, 1)
        self.xhat = centered * self.inv
        m = var.dtype.type(self.momentum)
        unbiased = square / xp.maximum(count - 1, 1)
        self.new_stats = ((1 - m) * p["running_mean"] + m * mean,
                          (1 - m) * p["running_var"] + m * unbiased)
        y = self.xhat * p["gamma"].reshape(shape)
        y += p["beta"].reshape(shape)
        return y

    def _backward_half(self, p, g, dy, ctx, need_dx):
        """The backward of `_forward_half`: sums in float32, dx in dy's dtype."""
        axes = (0, 2, 3) if dy.ndim == 4 else (0,)
        shape = (1, dy.shape[1]) + (1,) * (dy.ndim - 2)
        xhat, inv, n = self.xhat, self.inv, self.n
        self.xhat = self.inv = None
        g["running_mean"][...], g["running_var"][...] = self.new_stats
        dyx = acc_sum(dy * xhat, axes)  # (C,), this rank's share
        dyy = acc_sum(dy, axes)
        g["gamma"][...] = dyx
        g["beta"][...] = dyy
        if not need_dx:
            return None
        dyx, dyy = self._sum([dyx, dyy], ctx)  # the global batch's sums when synchronised
        # dx = gamma * inv * (dy - mean(dy) - xhat * mean(dy * xhat)), in one working array
        dx = xhat * (dyx / n).astype(dy.dtype, copy=False).reshape(shape)  # (B, C, H, W)
        xp = get_array_module(dy)
        xp.subtract(dy, dx, out=dx)
        dx -= (dyy / n).astype(dy.dtype, copy=False).reshape(shape)
        dx *= p["gamma"].reshape(shape) * inv  # (1, C, 1, 1)
        return dx


def _row_dots(a, b):
    """The dot product of each row of a and b (C, M) -> (C,), without an (C, M) temporary."""
    return (a[:, None, :] @ b[:, :, None]).reshape(-1)
