"""Train an MLP too large to keep whole on every rank: ZeRO stage 3 (comm.shard = "parameters").

    mpiexec -n 4 python examples/sharded_mlp.py                       # 784-4096-4096-2048-10
    mpiexec -n 2 python examples/sharded_mlp.py --hidden 256,128 --steps 20

Each rank keeps 1/p of the parameters, of the gradients and of the Adam state; a layer's
parameters are gathered just before its forward and backward pass and dropped after. The run
prints, per rank, what it held against the same model unsharded (a second, unsharded run of a
few steps), from the summary's memory fields.
"""

import argparse
import os

from mpi4py import MPI

import mpifed
from mpifed.data.synth import write_synthetic

FEATURES, CLASSES = 784, 10


def train(data: str, hidden: list[int], shard: str, steps: int, out: str):
    config = {
        "data": {"train": data},
        "model": {"kind": "mlp", "hidden": hidden},
        "optim": {"name": "adam", "lr": 1e-3, "batch_size": 32, "steps": steps},
        "comm": {"shard": shard},
        "run": {"seed": 0, "out": out, "progress": "none"},
    }
    return mpifed.train.run(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", default="4096,4096,2048", help="hidden widths, comma-separated")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--data", default="data/blobs-784.h5")
    parser.add_argument("--out", default="runs/sharded")
    args = parser.parse_args()
    hidden = [int(h) for h in args.hidden.split(",")]
    comm = MPI.COMM_WORLD
    if comm.rank == 0 and not os.path.exists(args.data):
        os.makedirs(os.path.dirname(args.data) or ".", exist_ok=True)
        write_synthetic(args.data, 20000, FEATURES, CLASSES, seed=0, noise=8.0)
    comm.Barrier()
    sharded = train(args.data, hidden, "parameters", args.steps, args.out)
    whole = train(args.data, hidden, "none", 2, args.out + "-unsharded")
    if comm.rank == 0:
        mib = 1 << 20
        print(f"MLP {FEATURES}-{'-'.join(map(str, hidden))}-{CLASSES} on {comm.size} ranks, "
              f"ZeRO-3: loss {sharded.loss:.4f} after {args.steps} steps")
        print("rank  parameters MiB (sharded / whole)  Adam state MiB (sharded / whole)")
        for r in range(comm.size):
            print(f"{r:>4}  {sharded['param_bytes'][r] / mib:>12.1f} / {whole['param_bytes'][r] / mib:<8.1f}"
                  f"       {sharded['optimizer_state_bytes'][r] / mib:>10.1f} / "
                  f"{whole['optimizer_state_bytes'][r] / mib:.1f}")


if __name__ == "__main__":
    main()
