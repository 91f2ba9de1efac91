"""Train on NumPy arrays from Python: every rank passes its own rows, a model object and a callback.

    mpiexec -n 2 python examples/train_arrays.py              # or: python examples/train_arrays.py
    mpiexec -n 2 python examples/train_arrays.py --steps 50 --out runs/arrays

Replace `my_rows` with your loader: each rank reads only its share. The run writes OUT/model.h5,
OUT/metrics.jsonl and OUT/config.toml as `mpifed train` does.
"""

import argparse

import numpy as np
from mpi4py import MPI

import mpifed
from mpifed.nn import Linear, ReLU, Sequential

SAMPLES, FEATURES, CLASSES = 4000, 16, 4


def my_rows(rank: int, size: int, test: bool = False):
    """Return this rank's (x, y) of a learnable toy set: x (rows, 16) float32, y (rows,) int64."""
    rng = np.random.default_rng(1 if test else 0)
    y = rng.integers(0, CLASSES, SAMPLES)
    x = (rng.standard_normal((SAMPLES, FEATURES)) + y[:, None]).astype(np.float32)
    lo, hi = rank * SAMPLES // size, (rank + 1) * SAMPLES // size
    return x[lo:hi], y[lo:hi]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/arrays")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    model = Sequential([Linear(64), ReLU(), Linear(CLASSES)], input_shape=(FEATURES,),
                       num_classes=CLASSES)

    def show(record):  # a StepRecord(step, loss, lr), the same on every rank
        if comm.rank == 0 and record.step % 100 == 0:
            print(f"step {record.step}: loss {record.loss:.4f}")

    config = {"optim": {"lr": 0.05, "momentum": 0.9, "batch_size": 32, "steps": args.steps},
              "run": {"out": args.out, "progress": "none"}}
    summary = mpifed.train.run(config, model=model, data=my_rows(comm.rank, comm.size),
                               test=my_rows(comm.rank, comm.size, test=True), callbacks=[show])
    if comm.rank == 0:
        print(f"test accuracy {summary.accuracy:.3f}, {summary['samples_per_s']:,.0f} samples/s")


if __name__ == "__main__":
    main()
