"""How random block-shuffled order is.

    python bench/shuffle_order.py [--rows 100000] [--seeds 0 1 2] [--skip-digits] [--json PATH]
    mpifed bench shuffle-order [...]         (the same)

1. Order statistics of one rank's shard (no training): the full permutation of an in-memory shard
   against block-shuffled orders (blocks of 334 rows, the 1 MiB chunks `mpifed data synth` writes
   for 784 features), over 5 epochs: the correlation of a row's position between consecutive
   epochs, the correlation of its position with its file row, and how often two neighbouring
   file rows land in the same batch of 128.
2. The digits demo's config (MLP 64-64-10, 2 ranks, 20 epochs) trained with the shard in memory
   (full permutation), streamed in block-shuffled order (MPIFED_SHARD_MEMORY_BYTES=1 and small
   blocks, since the digits file is one chunk), and streamed unshuffled; test accuracy per seed.
   Then again with train.h5 sorted by label, the worst case for a block order. --epochs
   changes the 20 epochs.

No step is timed here (what counts is the order and the accuracy), so there is no --warmup and
no harness record; --json writes both tables' rows.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .. import launch
from ..data.blocks import BlockPlan
from ..launch import mpifed_command
from .harness import Column, format_row, print_table

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
epochs = {epochs}
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


ORDER = [
    Column("order", 30, lambda r: r["order"], "<"),
    Column("corr(pos e, pos e+1)", 20, lambda r: f"{r['corr_epochs']:.4f}"),
    Column("corr(pos, row)", 15, lambda r: f"{r['corr_row']:.4f}"),
    Column("neighbours together", 19, lambda r: f"{r['neighbours_together']:.4f}"),
]


def order_table(rows: int, block: int, buffers, epochs: int, batch: int) -> list[dict]:
    """Print the order statistics of a full permutation and of block orders; return the rows."""
    full = [np.random.default_rng([0, e, 0]).permutation(rows) for e in range(epochs)]
    stats = [("full permutation (in memory)", order_stats(full, batch))]
    for buffer in buffers:
        plan = BlockPlan.of(0, rows, block, buffer)
        orders = [plan.epoch_order(0, e, 0) for e in range(epochs)]
        stats.append((f"blocks {block} x buffer {buffer}", order_stats(orders, batch)))
    table = [{"order": name, "corr_epochs": between, "corr_row": with_row,
              "neighbours_together": together}
             for name, (between, with_row, together) in stats]
    print_table(ORDER, table, f"one shard of {rows:,} rows, batch {batch}, {epochs} epochs, "
                "seed 0 rank 0")
    return table


def sort_by_label(path: str) -> None:
    """Rewrite a dataset file with its rows sorted by label (the worst case for block order)."""
    import h5py

    from mpifed.data.synth import write_arrays

    with h5py.File(path) as fh:
        x, y, classes = fh["x"][...], fh["y"][...], int(fh.attrs["num_classes"])
    order = np.argsort(y, kind="stable")
    write_arrays(path, x[order], y[order], num_classes=classes)


def digits_table(seeds, ranks: int, block: int, buffer: int, sort: bool,
                 epochs: int = 20) -> list[dict]:
    """Train the digits demo's config each way and seed; print a row of test accuracies per
    way and return the rows."""
    columns = [Column("way", 34, lambda r: r["way"], "<"),
               *[Column(f"seed {s}", 7, lambda r, k=k: f"{r['accuracy'][k]:.4f}")
                 for k, s in enumerate(seeds)],
               Column("mean", 7, lambda r: f"{r['mean']:.4f}")]
    ways = {"in memory, full permutation": ("true", "", None),
            f"streamed, blocks {block} x buffer {buffer}":
                ("true", f"shuffle_block = {block}\nshuffle_buffer = {buffer}", "1"),
            "streamed, unshuffled": ("false", "", "1")}
    print_table(columns, [], f"digits demo config, {ranks} ranks, train.h5 "
                f"{'sorted by label' if sort else 'as written (rows in random order)'}: "
                "test accuracy")
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        launch.run([*mpifed_command(), "data", "digits", tmp], check=True,
                       capture_output=True)
        if sort:
            sort_by_label(os.path.join(tmp, "train.h5"))
        for name, (shuffle, extra, memory) in ways.items():
            accuracy = [train_digits(tmp, ranks, shuffle, extra, memory, seed, epochs)
                        for seed in seeds]
            row = {"sorted": sort, "way": name, "seeds": list(seeds), "accuracy": accuracy,
                   "mean": float(np.mean(accuracy))}
            print(format_row(columns, row), flush=True)
            table.append(row)
    return table


def train_digits(data: str, ranks: int, shuffle: str, extra: str, memory: str | None,
                 seed: int, epochs: int) -> float:
    """Run `mpifed train` on the digits in `data` one way; return its test accuracy."""
    out = tempfile.mkdtemp(dir=data)
    config = Path(out, "run.toml")
    config.write_text(DIGITS.format(data=data, shuffle=shuffle, extra=extra, seed=seed,
                                    out=out, epochs=epochs))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("MPIFED_SHARD_MEMORY_BYTES", None)
    if memory:
        env["MPIFED_SHARD_MEMORY_BYTES"] = memory
    launch.run([*mpifed_command(ranks), "train", str(config)], check=True,
                   capture_output=True, env=env)
    summary = json.loads(Path(out, "metrics.jsonl").read_text().splitlines()[-1])
    return summary["accuracy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench shuffle-order", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="shard rows (order stats)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--epochs", type=int, default=20,
                        help="epochs of each digits run (default 20, the demo's)")
    parser.add_argument("--json", metavar="PATH",
                        help="write both tables' rows as JSON ({'orders': [...], 'digits': [...]})")
    args = parser.parse_args(argv)
    if args.rows < 2 or args.epochs < 1:
        raise ValueError(f"shuffle-order: need --rows >= 2 and --epochs >= 1 (got {args.rows}, "
                         f"{args.epochs}); raise the one that is too low")
    result = {"orders": order_table(args.rows, 334, [4, 256], epochs=5, batch=128), "digits": []}
    if not args.skip_digits:
        for sort in (False, True):
            result["digits"] += digits_table(args.seeds, 2, block=32, buffer=4, sort=sort,
                                             epochs=args.epochs)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
