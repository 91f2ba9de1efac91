"""How random block-shuffled order is: `python bench/shuffle_order.py [--help]`.

1. Order statistics of one rank's shard (no training): the full permutation of an in-memory shard
   against block-shuffled orders (blocks of 334 rows, the 1 MiB chunks `mpifed data synth` writes
   for 784 features), over 5 epochs: the correlation of a row's position between consecutive
   epochs, the correlation of its position with its file row, and how often two neighbouring
   file rows land in the same batch of 128.
2. The digits demo's config (MLP 64-64-10, 2 ranks, 20 epochs) trained with the shard in memory
   (full permutation), streamed in block-shuffled order (MPIFED_SHARD_MEMORY_BYTES=1 and small
   blocks, since the digits file is one chunk), and streamed unshuffled; test accuracy per seed.
   Then again with train.h5 sorted by label, the worst case for a block order.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from mpifed.data.blocks import BlockPlan

DIGITS = """
[data]
train = "{data}/train.h5"
test = "{data}/test.h5"
shuffle = {shuffle}
{extra}
[model]
kind = "mlp"
hidden = [64]
[optim]
lr = 0.1
momentum = 0.9
batch_size = 16
epochs = 20
schedule = "cosine"
warmup = 20
[run]
seed = {seed}
out = "{out}"
progress = "none"
log_every = 0
"""


def order_stats(orders: list[np.ndarray], batch: int) -> tuple[float, float, float]:
    """Return (epoch-to-epoch position correlation, position-row correlation, neighbour rate)."""
    positions = [np.argsort(order) for order in orders]  # positions[e][row]
    rows = np.arange(len(orders[0]))
    between = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(positions, positions[1:])])
    with_row = np.mean([np.corrcoef(p, rows)[0, 1] for p in positions])
    together = np.mean([np.mean(p[:-1] // batch == p[1:] // batch) for p in positions])
    return float(between), float(with_row), float(together)


def order_table(rows: int, block: int, buffers, epochs: int, batch: int) -> None:
    print(f"# one shard of {rows:,} rows, batch {batch}, {epochs} epochs, seed 0 rank 0")
    print(f"# {'order':<30} {'corr(pos e, pos e+1)':>20} {'corr(pos, row)':>15} "
          f"{'neighbours together':>19}")
    full = [np.random.default_rng([0, e, 0]).permutation(rows) for e in range(epochs)]
    stats = [("full permutation (in memory)", order_stats(full, batch))]
    for buffer in buffers:
        plan = BlockPlan.of(0, rows, block, buffer)
        orders = [plan.epoch_order(0, e, 0) for e in range(epochs)]
        stats.append((f"blocks {block} x buffer {buffer}", order_stats(orders, batch)))
    for name, (between, with_row, together) in stats:
        print(f"  {name:<30} {between:>20.4f} {with_row:>15.4f} {together:>19.4f}")


def sort_by_label(path: str) -> None:
    """Rewrite a dataset file with its rows sorted by label (the worst case for block order)."""
    import h5py

    from mpifed.data.synth import write_arrays

    with h5py.File(path) as fh:
        x, y, classes = fh["x"][...], fh["y"][...], int(fh.attrs["num_classes"])
    order = np.argsort(y, kind="stable")
    write_arrays(path, x[order], y[order], num_classes=classes)


def digits_table(seeds, ranks: int, block: int, buffer: int, sort: bool) -> None:
    mpifed = [sys.executable, "-m", "mpifed"]
    mpiexec = str(Path(sys.executable).with_name("mpiexec"))
    ways = {"in memory, full permutation": ("true", "", None),
            f"streamed, blocks {block} x buffer {buffer}":
                ("true", f"shuffle_block = {block}\nshuffle_buffer = {buffer}", "1"),
            "streamed, unshuffled": ("false", "", "1")}
    print(f"# digits demo config, {ranks} ranks, train.h5 "
          f"{'sorted by label' if sort else 'as written (rows in random order)'}: test accuracy")
    print(f"# {'way':<34} " + " ".join(f"{f'seed {s}':>7}" for s in seeds) + f" {'mean':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([*mpifed, "data", "digits", tmp], check=True, capture_output=True)
        if sort:
            sort_by_label(os.path.join(tmp, "train.h5"))
        for name, (shuffle, extra, memory) in ways.items():
            accuracy = []
            for seed in seeds:
                out = tempfile.mkdtemp(dir=tmp)
                config = Path(out, "run.toml")
                config.write_text(DIGITS.format(data=tmp, shuffle=shuffle, extra=extra,
                                                seed=seed, out=out))
                env = dict(os.environ, OMP_NUM_THREADS="1")
                env.pop("MPIFED_SHARD_MEMORY_BYTES", None)
                if memory:
                    env["MPIFED_SHARD_MEMORY_BYTES"] = memory
                subprocess.run([mpiexec, "-n", str(ranks), *mpifed, "train", str(config)],
                               check=True, capture_output=True, env=env)
                summary = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
                accuracy.append(summary["accuracy"])
            print(f"  {name:<34} " + " ".join(f"{a:>7.4f}" for a in accuracy)
                  + f" {np.mean(accuracy):>7.4f}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="shard rows (order stats)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args(argv)
    order_table(args.rows, 334, [4, 256], epochs=5, batch=128)
    if not args.skip_digits:
        for sort in (False, True):
            digits_table(args.seeds, 2, block=32, buffer=4, sort=sort)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
