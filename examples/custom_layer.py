"""Write a layer of your own in Python, check its backward pass, and train a model that uses it.

    python examples/custom_layer.py                  # one process
    mpiexec -n 2 python examples/custom_layer.py --steps 200

A layer gives its parameters' shapes, a forward pass that keeps what the backward needs, and a
backward pass that writes its gradients into the flat gradient buffer and returns the input's
gradient (docs/model.md, "Writing a layer"). Here: a learned scale per feature, y = x * s. The
script compares its backward with central finite differences in float64 before training.
"""

import argparse

import numpy as np
from mpi4py import MPI

import mpifed
from mpifed.nn import Linear, ReLU, Sequential
from mpifed.nn.layers import Layer
from mpifed.xp import get_array_module

FEATURES, CLASSES, SAMPLES = 16, 4, 4000


class FeatureScale(Layer):
    """y[:, f] = x[:, f] * s[f] for x (B, F): one learned scale per feature."""

    type = "feature_scale"

    def params(self):
        return [("s", self.in_shape)]  # (F,)

    def init(self, rng, p):
        p["s"][...] = 1.0

    def forward(self, p, x, ctx):
        self.x = x  # (B, F), kept for the backward pass
        return x * p["s"]

    def backward(self, p, g, dy, ctx, need_dx=True):
        xp = get_array_module(dy)
        g["s"][...] = xp.sum(dy * self.x, axis=0)  # (F,), written into the flat gradient buffer
        return dy * p["s"] if need_dx else None


def gradient_error(seed: int = 0) -> float:
    """Return max |analytic - finite-difference| of d(sum(y * w))/ds and /dx, in float64."""
    rng = np.random.default_rng(seed)
    layer = FeatureScale()
    layer.build((FEATURES,), "example")
    s, x, w = (rng.standard_normal(shape) for shape in ((FEATURES,), (3, FEATURES), (3, FEATURES)))
    grads = {"s": np.zeros(FEATURES)}
    layer.forward({"s": s}, x, None)
    dx = layer.backward({"s": s}, grads, w, None)
    eps, worst = 1e-6, 0.0
    for name, value, analytic in (("s", s, grads["s"]), ("x", x, dx)):
        flat = value.reshape(-1)
        for i in range(flat.size):
            saved = flat[i]
            flat[i] = saved + eps
            up = float(np.sum(layer.forward({"s": s}, x, None) * w))
            flat[i] = saved - eps
            down = float(np.sum(layer.forward({"s": s}, x, None) * w))
            flat[i] = saved
            worst = max(worst, abs((up - down) / (2 * eps) - analytic.reshape(-1)[i]))
    return worst


def my_rows(rank: int, size: int, test: bool = False):
    """This rank's rows of a toy set whose classes differ in a few scaled features."""
    rng = np.random.default_rng(1 if test else 0)
    y = rng.integers(0, CLASSES, SAMPLES)
    x = rng.standard_normal((SAMPLES, FEATURES)).astype(np.float32)
    x[np.arange(SAMPLES), y] += 3.0
    lo, hi = rank * SAMPLES // size, (rank + 1) * SAMPLES // size
    return x[lo:hi], y[lo:hi]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/custom-layer")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    error = gradient_error()
    if comm.rank == 0:
        print(f"FeatureScale backward vs finite differences: max error {error:.2e}")
    if error > 1e-6:
        raise SystemExit("the backward pass disagrees with finite differences")
    model = Sequential([FeatureScale(), Linear(32), ReLU(), Linear(CLASSES)],
                       input_shape=(FEATURES,), num_classes=CLASSES)
    config = {"optim": {"lr": 0.05, "momentum": 0.9, "batch_size": 32, "steps": args.steps},
              "run": {"out": args.out, "progress": "none"}}
    summary = mpifed.train.run(config, model=model, data=my_rows(comm.rank, comm.size),
                               test=my_rows(comm.rank, comm.size, test=True))
    if comm.rank == 0:
        print(f"a model with FeatureScale on {comm.size} ranks: test accuracy "
              f"{summary.accuracy:.4f}")


if __name__ == "__main__":
    main()
