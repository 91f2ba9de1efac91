"""Train an MLP on scikit-learn's handwritten digits, data-parallel over the ranks.

    mpiexec -n 2 python examples/digits_mlp.py                 # about 10 s on 2 cores
    mpiexec -n 2 python examples/digits_mlp.py --epochs 2 --out runs/digits

Rank 0 writes DATA/train.h5 and DATA/test.h5 once (1,437 and 360 images of 8x8 pixels, 10
classes; needs scikit-learn); each rank then reads only its own rows of them. The run writes
OUT/model.h5, OUT/metrics.jsonl and OUT/config.toml, as `mpifed train` does.
"""

import argparse
import os

from mpi4py import MPI

import mpifed
from mpifed.data.synth import write_digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--data", default="data/digits", help="folder for train.h5, test.h5")
    parser.add_argument("--out", default="runs/digits")
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    if comm.rank == 0 and not os.path.exists(os.path.join(args.data, "test.h5")):
        write_digits(args.data)
    comm.Barrier()  # the files exist before any rank opens them
    config = {
        "data": {"train": f"{args.data}/train.h5", "test": f"{args.data}/test.h5"},
        "model": {"kind": "mlp", "hidden": [64]},
        "optim": {"lr": 0.1, "momentum": 0.9, "batch_size": 16, "epochs": args.epochs,
                  "schedule": "cosine", "warmup": 20},  # batch_size per rank
        "run": {"seed": 0, "out": args.out, "progress": "none"},
    }
    summary = mpifed.train.run(config)
    if comm.rank == 0:
        print(f"digits MLP on {comm.size} ranks: test accuracy {summary.accuracy:.4f}, "
              f"{summary['samples_per_s']:,.0f} samples/s")


if __name__ == "__main__":
    main()
