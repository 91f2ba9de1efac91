"""Bytes and communication share of a federated round.

    python bench/federated_round.py [--rounds 6] [--local-steps 10] [--warmup 10] [--layouts ..]
    mpifed bench federated-round [...] [--records runs.jsonl]     (the same)

The benchmark MLP 784-512-256-10 (mlp.py; float32, 535,818 parameters), 4 ranks, IID synthetic data
split over the institutions, FedAvg, batch 128 per rank. Prints, per layout, the bytes each round
sends to and from the root against the design's minimum (each non-root leader sends one model and
receives one), the round time, and its share spent communicating (leader exchange + in-site all-
reduce). "4 x 1 sa+dp" and "4 x 1 auth" are authenticated secure aggregation with DP
(federated.keys, which DP requires; q = 1 and q = 0.5, every leader sends every round); the last
lines give each private layout's round time over plain FedAvg's, measured in the same run, and
each compressed layout's ("rot8", "rot4": federated.compression = "rotated" at 8 and 4 bits;
"sa rot8" under secure aggregation) bytes to the root and accuracy against its uncompressed
peer's. Accuracy: the last round's global model on all the rows (data.test = the pooled
training file; the benchmark measures the exchange, not generalisation). The
rounds are timed by `mpifed train` itself (metrics.jsonl); the harness's warm-up applies as whole
rounds: those covering the first --warmup training steps (the harness default, as for every
benchmark) are left out of the means.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .. import launch
from ..launch import mpifed_command
from .harness import (
    WARMUP,
    Column,
    Record,
    Timing,
    append_records,
    format_row,
    warmup_rounds,
)
from .harness import print_table as table
from .mlp import FEATURES, NAME, PARAMETERS, model_toml

CONFIG = """
[data]
train = "{sites}/site-{{institution}}.h5"
test = "{test}"
""" + model_toml() + """
[optim]
lr = 0.01
momentum = 0.9
batch_size = 128
[federated]
rounds = {rounds}
local_steps = {local_steps}
strategy = "fedavg"
{layout}
[run]
out = "{out}"
progress = "none"
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench federated-round", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=WARMUP,
                        help="training steps before timing (default %(default)s): the first "
                             "rounds that cover them are left out")
    parser.add_argument("--records", metavar="PATH",
                        help="append one harness record per layout (JSON Lines)")
    parser.add_argument("--layouts", metavar="NAMES",
                        help="comma-separated layout names to run (default: all; the plain "
                             "'4 x 1 rank' always runs: the ratios are against it)")
    args = parser.parse_args(argv)
    skip = warmup_rounds(args.warmup, args.local_steps)
    if args.rounds - skip < 1:
        parser.error(f"--rounds {args.rounds} leaves no timed round after the {skip} warm-up "
                     f"round(s) (--warmup {args.warmup} steps at --local-steps "
                     f"{args.local_steps}); raise --rounds or lower --warmup")
    mpifed = mpifed_command()
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
    layouts = {"4 x 1 rank": ("institutions = 4", 4),
               "4 x 1 secagg": ("institutions = 4\nsecure_aggregation = true", 4),
               # SA + DP needs identity keys (refused without): q = 1, every leader trains
               "4 x 1 sa+dp": ("institutions = 4\nsecure_aggregation = true\n"
                               "keys = \"{keys}\"\nsecure_range = 8.0\n[federated.dp]\nclip = 1.0\n"
                               "noise_multiplier = 1.0", 4),
               # authenticated (signed keys, consistency round), every leader every round
               "4 x 1 auth": ("institutions = 4\nsecure_aggregation = true\n"
                              "keys = \"{keys}\"\nsecure_range = 8.0\nfraction = 0.5\n"
                              "[federated.dp]\nclip = 1.0\nnoise_multiplier = 1.0", 4),
               "2 x 2 ranks": ("institutions = 2", 2),
               "[1, 2, 1]": ("institution_sizes = [1, 2, 1]", 3),
               # federated.compression: the updates rotated and rounded to b bits
               "4 x 1 rot8": ("institutions = 4\ncompression = \"rotated\"", 4),
               "4 x 1 rot4": ("institutions = 4\ncompression = \"rotated\"\n"
                              "compression_bits = 4", 4),
               "4 x 1 sa rot8": ("institutions = 4\nsecure_aggregation = true\n"
                                 "compression = \"rotated\"", 4)}
    if args.layouts:
        wanted = {"4 x 1 rank", *(n.strip() for n in args.layouts.split(","))}
        unknown = wanted - set(layouts)
        if unknown:
            parser.error(f"--layouts: no layout {sorted(unknown)} (the layouts: "
                         f"{', '.join(layouts)})")
        layouts = {k: v for k, v in layouts.items() if k in wanted}
    params = PARAMETERS
    print(f"# federated round, {NAME} ({params:,} float32 parameters = "
          f"{4 * params:,} B), 4 ranks, FedAvg, {args.local_steps} local steps, batch 128/rank")
    table(COLUMNS, [])  # the header; each layout's row prints as soon as it is measured
    seconds, records, to_root, accuracy = {}, [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        data, keys = os.path.join(tmp, "all.h5"), os.path.join(tmp, "keys")
        launch.run([*mpifed, "keys", "generate", keys, "--institutions", "4"], check=True,
                       capture_output=True)
        launch.run([*mpifed, "data", "synth", data, "--samples", "20000", "--features",
                        str(FEATURES), "--classes", "10"], check=True, capture_output=True)
        for name, (layout, sites) in layouts.items():
            site_dir = os.path.join(tmp, f"sites{sites}")
            if not os.path.isdir(site_dir):  # layouts of one site count share the split
                launch.run([*mpifed, "data", "partition", data, site_dir, "--institutions",
                                str(sites)], check=True, capture_output=True)
            out = os.path.join(tmp, f"out-{len(seconds)}")
            config = os.path.join(tmp, f"fed-{len(seconds)}.toml")
            Path(config).write_text(CONFIG.format(sites=site_dir, layout=layout.format(keys=keys),
                                                  out=out, test=data,
                                                  rounds=args.rounds,
                                                  local_steps=args.local_steps))
            launch.run([*mpifed_command(4), "train", config], check=True,
                           capture_output=True, env=env)
            rounds = round_records(out)[skip:]  # the warm-up rounds
            minimum = (sites - 1) * 4 * params
            mean = {k: float(np.mean([r[k] for r in rounds])) for k in
                    ("bytes_to_root", "bytes_from_root", "round_seconds", "exchange_seconds",
                     "allreduce_seconds", "comm_fraction")}
            # the last round's model on all the rows
            mean.update(accuracy=rounds[-1]["accuracy"], test_loss=rounds[-1]["test_loss"])
            seconds[name] = mean["round_seconds"]
            to_root[name] = mean["bytes_to_root"]
            accuracy[name] = (mean["accuracy"], mean["test_loss"])
            print(format_row(COLUMNS, dict(mean, layout=name, minimum=minimum)), flush=True)
            records.append(record(name, layout, sites, [r["round_seconds"] for r in rounds],
                                  dict(mean, minimum_bytes=minimum), skip, args))
    if args.records:
        append_records(args.records, records)
    plain = seconds["4 x 1 rank"]
    for name in ("4 x 1 secagg", "4 x 1 sa+dp", "4 x 1 auth"):
        if name in seconds:
            print(f"# {name} round time / plain FedAvg's: {seconds[name] / plain:.2f}x")
    for name, base in (("4 x 1 rot8", "4 x 1 rank"), ("4 x 1 rot4", "4 x 1 rank"),
                       ("4 x 1 sa rot8", "4 x 1 secagg")):
        if name in to_root and base in to_root:
            print(f"# {name}: bytes to root / {base}'s: 1/{to_root[base] / to_root[name]:.1f}; "
                  f"accuracy {accuracy[name][0]:.4f} vs {accuracy[base][0]:.4f} "
                  f"({100 * (accuracy[name][0] - accuracy[base][0]):+.2f} points), loss "
                  f"{accuracy[name][1]:.4f} vs {accuracy[base][1]:.4f}")
    return 0


COLUMNS = [
    Column("layout", 12, lambda r: r["layout"], "<"),
    Column("to root B", 11, lambda r: f"{r['bytes_to_root']:,.0f}"),
    Column("from root B", 11, lambda r: f"{r['bytes_from_root']:,.0f}"),
    Column("minimum B", 11, lambda r: f"{r['minimum']:,}"),
    Column("round s", 8, lambda r: f"{r['round_seconds']:.3f}"),
    Column("exchange s", 10, lambda r: f"{r['exchange_seconds']:.3f}"),
    Column("allreduce s", 11, lambda r: f"{r['allreduce_seconds']:.3f}"),
    Column("comm %", 7, lambda r: f"{100 * r['comm_fraction']:.1f}%"),
    Column("accuracy", 8, lambda r: f"{r['accuracy']:.4f}"),
    Column("loss", 7, lambda r: f"{r['test_loss']:.4f}"),
]


TIMING = ("round_seconds", "exchange_seconds", "allreduce_seconds", "comm_fraction")


def round_records(out: str) -> list[dict]:
    """Return the root's round records with their timing; under privacy the root's records
    keep none of institution 0's (or, under secret sampling, any) timing, so it comes from
    institution 0's own file: its leader is the root, and so is its clock."""
    def rounds(path):
        return [r for r in map(json.loads, Path(path).open()) if r.get("event") == "round"]
    records = rounds(os.path.join(out, "metrics.jsonl"))
    own = os.path.join(out, "institution-0", "metrics.jsonl")
    if os.path.exists(own):
        timing = {r["round"]: {k: r[k] for k in TIMING} for r in rounds(own)}
        for r in records:
            r.update(timing[r["round"]])
    return records


def record(name: str, layout: str, sites: int, round_seconds: list[float], metrics: dict,
           skip: int, args) -> Record:
    """The harness record of one layout: each timed round is one repeat of one round (the
    rounds are timed by `mpifed train`'s loop, which this benchmark runs as users do)."""
    timing = Timing(skip, 1, 0, round_seconds, [])
    config = {"layout": name, "federated": layout, "institutions": sites, "model": NAME,
              "batch_per_rank": 128, "local_steps": args.local_steps, "rounds": args.rounds,
              "strategy": "fedavg", "warmup_steps": args.warmup}
    return Record.build("federated-round", "mpifed", name, 4, config, [timing], metrics,
                        unit="round")


if __name__ == "__main__":
    raise SystemExit(main())
