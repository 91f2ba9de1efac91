"""Train ResNet-8 on CIFAR-shaped synthetic images (3x32x32, 10 classes), data-parallel.

    mpiexec -n 2 python examples/resnet_cifar.py               # a few minutes on 2 cores
    mpiexec -n 2 python examples/resnet_cifar.py --train 2048 --epochs 2 --batch-size 32

The images are class patterns placed at random positions over noise (`mpifed data synth
--shape 3,32,32`): a convnet learns them, a linear model does not. One set is written and its
last fifth held out as the test set (the same class patterns, other images). Batch norm uses
each rank's own batch statistics, as PyTorch DDP's BatchNorm2d does. For CIFAR-10 itself, write
its arrays with `mpifed data from-numpy` and point data.train and data.test at the files.
"""

import argparse
import os

import h5py
from mpi4py import MPI

import mpifed
from mpifed.data.synth import write_synthetic_images

SHAPE, CLASSES = (3, 32, 32), 10


def write_split(folder: str, train: str, test: str, n_train: int, n_test: int) -> None:
    """Write n_train + n_test synthetic images, then the first n_train rows to `train` and the
    rest to `test` (x (rows, 3, 32, 32) float32, y (rows,) int64, num_classes)."""
    os.makedirs(folder, exist_ok=True)
    whole = os.path.join(folder, "whole.h5")
    write_synthetic_images(whole, n_train + n_test, SHAPE, CLASSES, seed=0, force=True)
    with h5py.File(whole, "r") as src:
        for path, rows in ((train, slice(0, n_train)), (test, slice(n_train, None))):
            with h5py.File(path, "w") as dst:
                dst["x"], dst["y"] = src["x"][rows], src["y"][rows]
                dst.attrs["num_classes"] = CLASSES
    os.remove(whole)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=10000, help="training images")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64, help="per rank")
    parser.add_argument("--data", default="data/cifar-shaped")
    parser.add_argument("--out", default="runs/resnet")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    train, test = (os.path.join(args.data, f"{name}-{args.train}.h5") for name in ("train", "test"))
    if comm.rank == 0 and not os.path.exists(test):
        write_split(args.data, train, test, args.train, max(args.train // 4, 500))
    comm.Barrier()  # the files exist before any rank opens them
    config = {
        "data": {"train": train, "test": test},
        "model": {"kind": "resnet", "depth": 8},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4, "batch_size": args.batch_size,
                  "epochs": args.epochs, "schedule": "cosine", "warmup": 10},
        "run": {"seed": 0, "out": args.out, "progress": "none"},
    }
    summary = mpifed.train.run(config)
    if comm.rank == 0:
        print(f"ResNet-8 on {comm.size} ranks: test accuracy {summary.accuracy:.4f}, "
              f"{summary['samples_per_s']:,.0f} images/s")


if __name__ == "__main__":
    main()
