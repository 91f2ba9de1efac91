"""SGD (momentum, Nesterov, weight decay), Adam and AdamW on flat buffers, updated in place.

Conventions follow PyTorch's, so results compare: weight decay adds wd * w to the gradient;
momentum keeps v = mu v + g; Nesterov steps along g + mu v.

The updates run chunk by chunk through preallocated scratch of CHUNK elements, so an optimiser
step never allocates a temporary the size of the model (Adam's expression form made five, which
set the peak memory of a sharded step). The arithmetic, operation for operation, is that of the
expressions written in each docstring: the bits do not depend on the chunking.
"""

from __future__ import annotations

from ..xp import get_array_module

OPTIMIZERS = ("sgd", "adam", "adamw")  # optim.name: the choices of make_optimizer
CHUNK = 1 << 18  # elements per piece of an update: 1 MiB of float32 scratch, stays in cache


def chunks(n: int, size: int = CHUNK):
    """Yield (start, stop) pieces of at most `size` covering range(n)."""
    for lo in range(0, n, size):
        yield lo, min(lo + size, n)


class Scratch:
    """Reusable scratch arrays of up to CHUNK elements, per array module and dtype."""

    def __init__(self, count: int):
        self.count, self.arrays = count, None

    def get(self, like, n: int) -> list:
        """Return `count` arrays of n <= CHUNK elements like `like` (views of cached ones)."""
        arrays = self.arrays
        if arrays is None or arrays[0].dtype != like.dtype or type(arrays[0]) is not type(like):
            xp = get_array_module(like)
            arrays = self.arrays = [xp.empty(CHUNK, dtype=like.dtype) for _ in range(self.count)]
        return [a[:n] for a in arrays]


# The optimizers' defaults, written once: the constructors use them, and the [optim] section
# of mpifed/config/sections.py declares its keys' defaults from them (a test checks both).
SGD_DEFAULTS = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}
ADAM_DEFAULTS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}


class SGD:
    """Stochastic gradient descent; state: the momentum buffer (flat, like the parameters)."""

    def __init__(self, momentum=SGD_DEFAULTS["momentum"], nesterov=SGD_DEFAULTS["nesterov"],
                 weight_decay=SGD_DEFAULTS["weight_decay"]):
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.velocity = None
        self._scratch = Scratch(1)

    def step(self, params, grad, lr: float, offset: int = 0) -> None:
        """Update `params` in place from `grad` (same shape); `grad` is used as scratch.
        offset: where `params` starts in the model's flat buffer (a shard's; unused here).

        g += wd * w; v = mu * v + g; w -= lr * (g + mu * v) (Nesterov) or lr * v (momentum)
        or lr * g (plain).
        """
        xp = get_array_module(params)
        if self.momentum and self.velocity is None:
            self.velocity = xp.zeros_like(params)
        lr = params.dtype.type(lr)
        for lo, hi in chunks(params.size):
            self._step_chunk(xp, params[lo:hi], grad[lo:hi], lr,
                             None if self.velocity is None else self.velocity[lo:hi])

    def _step_chunk(self, xp, w, g, lr, v) -> None:
        """SGD's update on one piece: w, g, v views of at most CHUNK elements."""
        (t,) = self._scratch.get(w, w.size)
        if self.weight_decay:
            xp.multiply(w, self.weight_decay, out=t)
            g += t
        if self.momentum:
            v *= self.momentum
            v += g
            if self.nesterov:
                xp.multiply(v, self.momentum, out=t)
                g += t
                g *= lr
            else:
                xp.multiply(v, lr, out=g)
        else:
            g *= lr
        w -= g

    def state(self) -> dict:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned (from a checkpoint)."""
        self.velocity = state.get("velocity")


class Adam:
    """Adam (Kingma and Ba 2015) with bias correction; state: m, v and the step count."""

    def __init__(self, beta1=ADAM_DEFAULTS["beta1"], beta2=ADAM_DEFAULTS["beta2"],
                 eps=ADAM_DEFAULTS["eps"], weight_decay=SGD_DEFAULTS["weight_decay"]):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = self.v = None
        self.t = 0
        self._scratch = Scratch(2)

    def step(self, params, grad, lr: float, offset: int = 0) -> None:
        """Update `params` in place from `grad` (same shape); `grad` is used as scratch.
        offset: where `params` starts in the model's flat buffer (a shard's; unused here).

        g += wd * w; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g g;
        w -= (lr sqrt(1 - b2^t) / (1 - b1^t)) m / (sqrt(v) + eps).
        """
        xp = get_array_module(params)
        if self.m is None:
            self.m, self.v = xp.zeros_like(params), xp.zeros_like(params)
        self.t += 1
        scale = lr * (1 - self.beta2 ** self.t) ** 0.5 / (1 - self.beta1 ** self.t)
        scale = params.dtype.type(scale)
        for lo, hi in chunks(params.size):
            self._step_chunk(xp, params[lo:hi], grad[lo:hi], self.m[lo:hi], self.v[lo:hi],
                             scale)

    def _step_chunk(self, xp, w, g, m, v, scale) -> None:
        """Adam's update on one piece: w, g, m, v views of at most CHUNK elements."""
        t, d = self._scratch.get(w, w.size)
        if self.weight_decay:
            xp.multiply(w, self.weight_decay, out=t)
            g += t
        self._moments(xp, g, m, v, t)
        xp.sqrt(v, out=d)
        d += self.eps
        xp.multiply(m, scale, out=t)
        t /= d
        w -= t

    def _moments(self, xp, g, m, v, t) -> None:
        """m = b1 m + (1 - b1) g and v = b2 v + (1 - b2) g^2 in place; t: working space."""
        m *= self.beta1
        xp.multiply(g, 1 - self.beta1, out=t)
        m += t
        v *= self.beta2
        xp.multiply(g, 1 - self.beta2, out=t)
        t *= g
        v += t

    def state(self) -> dict:
        return {} if self.m is None else {"m": self.m, "v": self.v, "t": self.t}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned (from a checkpoint)."""
        self.m, self.v, self.t = state.get("m"), state.get("v"), int(state.get("t", 0))


class AdamW(Adam):
    """AdamW (Loshchilov and Hutter 2019) as PyTorch's: weight decay apart from the gradient,
    w *= 1 - lr wd, on the elements of `decayed` only (ranges of the flat buffer: the arrays of
    two or more dimensions, not biases or LayerNorm), then Adam's update in PyTorch's form
    w -= (lr / (1 - b1^t)) m / (sqrt(v) / sqrt(1 - b2^t) + eps). State as Adam's."""

    def __init__(self, beta1=ADAM_DEFAULTS["beta1"], beta2=ADAM_DEFAULTS["beta2"],
                 eps=ADAM_DEFAULTS["eps"], weight_decay=SGD_DEFAULTS["weight_decay"],
                 decayed=()):
        super().__init__(beta1, beta2, eps, 0.0)
        self.decay, self.decayed = weight_decay, tuple(decayed)

    def step(self, params, grad, lr: float, offset: int = 0) -> None:
        """Update `params` (elements [offset, offset + size) of the model) from `grad`."""
        xp = get_array_module(params)
        if self.m is None:
            self.m, self.v = xp.zeros_like(params), xp.zeros_like(params)
        self.t += 1
        if self.decay:
            keep = params.dtype.type(1 - lr * self.decay)
            for a, b in self.decayed:
                a, b = max(a - offset, 0), min(b - offset, params.size)
                if b > a:
                    params[a:b] *= keep
        step_size = params.dtype.type(lr / (1 - self.beta1 ** self.t))
        root = params.dtype.type((1 - self.beta2 ** self.t) ** 0.5)
        for lo, hi in chunks(params.size):
            self._adamw_chunk(xp, params[lo:hi], grad[lo:hi], self.m[lo:hi], self.v[lo:hi],
                              step_size, root)

    def _adamw_chunk(self, xp, w, g, m, v, step_size, root) -> None:
        t, d = self._scratch.get(w, w.size)
        self._moments(xp, g, m, v, t)
        xp.sqrt(v, out=d)
        d /= root
        d += self.eps
        xp.multiply(m, step_size, out=t)
        t /= d
        w -= t


def make_optimizer(optim, spec=None, dtype="float32"):
    """Return the optimiser that `optim` (the OptimConfig, or any object with its attributes)
    names. spec: the model, whose arrays of two or more dimensions AdamW decays (all of them
    when no model is given). The optimiser carries optim.grad_clip as `grad_clip`."""
    if optim.name == "sgd":
        made = SGD(optim.momentum, optim.nesterov, optim.weight_decay)
    elif optim.name == "adamw":
        decayed = spec.decayed_ranges(dtype) if spec is not None else ((0, 1 << 62),)
        made = AdamW(optim.beta1, optim.beta2, optim.eps, optim.weight_decay, decayed)
    else:
        made = Adam(optim.beta1, optim.beta2, optim.eps, optim.weight_decay)
    made.grad_clip = float(getattr(optim, "grad_clip", 0.0) or 0.0)
    return made
