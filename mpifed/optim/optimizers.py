"""SGD (momentum, Nesterov, weight decay) and Adam on flat buffers, updated in place.

Conventions follow PyTorch's, so results compare: weight decay adds wd * w to the gradient;
momentum keeps v = mu v + g; Nesterov steps along g + mu v.
"""

from __future__ import annotations

from ..xp import get_array_module

OPTIMIZERS = ("sgd", "adam")  # optim.name: the choices of make_optimizer


class SGD:
    """Stochastic gradient descent; state: the momentum buffer (flat, like the parameters)."""

    def __init__(self, momentum=0.0, nesterov=False, weight_decay=0.0):
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.velocity = None

    def step(self, params, grad, lr: float) -> None:
        """Update `params` in place from `grad` (same shape); `grad` is used as scratch."""
        xp = get_array_module(params)
        if self.weight_decay:
            grad += self.weight_decay * params
        if self.momentum:
            if self.velocity is None:
                self.velocity = xp.zeros_like(params)
            self.velocity *= self.momentum
            self.velocity += grad
            if self.nesterov:
                grad += self.momentum * self.velocity
                grad *= params.dtype.type(lr)
            else:
                xp.multiply(self.velocity, params.dtype.type(lr), out=grad)
        else:
            grad *= params.dtype.type(lr)  # in place: no temporary the size of the model
        params -= grad

    def state(self) -> dict:
        return {} if self.velocity is None else {"velocity": self.velocity}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned (from a checkpoint)."""
        self.velocity = state.get("velocity")


class Adam:
    """Adam (Kingma and Ba 2015) with bias correction; state: m, v and the step count."""

    def __init__(self, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.m = self.v = None
        self.t = 0

    def step(self, params, grad, lr: float) -> None:
        xp = get_array_module(params)
        if self.m is None:
            self.m, self.v = xp.zeros_like(params), xp.zeros_like(params)
        if self.weight_decay:
            grad += self.weight_decay * params
        self.t += 1
        self.m *= self.beta1
        self.m += (1 - self.beta1) * grad
        self.v *= self.beta2
        self.v += (1 - self.beta2) * grad * grad
        scale = lr * (1 - self.beta2 ** self.t) ** 0.5 / (1 - self.beta1 ** self.t)
        params -= params.dtype.type(scale) * self.m / (xp.sqrt(self.v) + self.eps)

    def state(self) -> dict:
        return {} if self.m is None else {"m": self.m, "v": self.v, "t": self.t}

    def load_state(self, state: dict) -> None:
        """Restore what `state()` returned (from a checkpoint)."""
        self.m, self.v, self.t = state.get("m"), state.get("v"), int(state.get("t", 0))


def make_optimizer(cfg: dict):
    """Return the optimiser that the `[optim]` section names."""
    if cfg["name"] == "sgd":
        return SGD(cfg["momentum"], cfg["nesterov"], cfg["weight_decay"])
    return Adam(cfg["beta1"], cfg["beta2"], cfg["eps"], cfg["weight_decay"])
