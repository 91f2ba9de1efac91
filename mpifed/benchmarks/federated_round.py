"""Bytes and communication share of a federated round.

    python bench/federated_round.py [--rounds 6] [--local-steps 10]
    mpifed bench federated-round [...]                       (the same)

The benchmark MLP 784-512-256-10 (mlp.py; float32, 535,818 parameters), 4 ranks, IID synthetic data
split over the institutions, FedAvg, batch 128 per rank. Prints, per layout, the bytes each round
sends to and from the root against the design's minimum (each non-root leader sends one model and
receives one), the round time, and its share spent communicating (leader exchange + in-site all-
reduce). "4 x 1 auth" is authenticated secure aggregation with DP (federated.keys, q = 0.5, every
leader sends every round); the last lines give each private layout's round time over plain
FedAvg's, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from ..launch import mpifed_command
from .mlp import FEATURES, NAME, PARAMETERS, model_toml

CONFIG = """
[data]
train = "{sites}/site-{{institution}}.h5"
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
    args = parser.parse_args(argv)
    mpifed = mpifed_command()
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
    layouts = {"4 x 1 rank": ("institutions = 4", 4),
               "4 x 1 secagg": ("institutions = 4\nsecure_aggregation = true", 4),
               "4 x 1 sa+dp": ("institutions = 4\nsecure_aggregation = true\n"
                               "secure_range = 8.0\n[federated.dp]\nclip = 1.0\n"
                               "noise_multiplier = 1.0", 4),
               # authenticated (signed keys, consistency round), every leader every round
               "4 x 1 auth": ("institutions = 4\nsecure_aggregation = true\n"
                              "keys = \"{keys}\"\nsecure_range = 8.0\nfraction = 0.5\n"
                              "[federated.dp]\nclip = 1.0\nnoise_multiplier = 1.0", 4),
               "2 x 2 ranks": ("institutions = 2", 2),
               "[1, 2, 1]": ("institution_sizes = [1, 2, 1]", 3)}
    params = PARAMETERS
    print(f"# federated round, {NAME} ({params:,} float32 parameters = "
          f"{4 * params:,} B), 4 ranks, FedAvg, {args.local_steps} local steps, batch 128/rank")
    print(f"# {'layout':<12} {'to root B':>11} {'from root B':>11} {'minimum B':>11} "
          f"{'round s':>8} {'exchange s':>10} {'allreduce s':>11} {'comm %':>7}")
    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        data, keys = os.path.join(tmp, "all.h5"), os.path.join(tmp, "keys")
        subprocess.run([*mpifed, "keys", "generate", keys, "--institutions", "4"], check=True,
                       capture_output=True)
        subprocess.run([*mpifed, "data", "synth", data, "--samples", "20000", "--features",
                        str(FEATURES), "--classes", "10"], check=True, capture_output=True)
        for name, (layout, sites) in layouts.items():
            site_dir = os.path.join(tmp, f"sites{sites}")
            if not os.path.isdir(site_dir):  # layouts of one site count share the split
                subprocess.run([*mpifed, "data", "partition", data, site_dir, "--institutions",
                                str(sites)], check=True, capture_output=True)
            out = os.path.join(tmp, f"out-{len(seconds)}")
            config = os.path.join(tmp, f"fed-{len(seconds)}.toml")
            Path(config).write_text(CONFIG.format(sites=site_dir, layout=layout.format(keys=keys),
                                                  out=out,
                                                  rounds=args.rounds,
                                                  local_steps=args.local_steps))
            subprocess.run([*mpifed_command(4), "train", config], check=True,
                           capture_output=True, env=env)
            rounds = [json.loads(line) for line in Path(out, "metrics.jsonl").open()
                      if '"round"' in line][1:]  # the first round includes warm-up
            minimum = (sites - 1) * 4 * params
            mean = {k: float(np.mean([r[k] for r in rounds])) for k in
                    ("bytes_to_root", "bytes_from_root", "round_seconds", "exchange_seconds",
                     "allreduce_seconds", "comm_fraction")}
            seconds[name] = mean["round_seconds"]
            print(f"  {name:<12} {mean['bytes_to_root']:>11,.0f} {mean['bytes_from_root']:>11,.0f} "
                  f"{minimum:>11,} {mean['round_seconds']:>8.3f} {mean['exchange_seconds']:>10.3f} "
                  f"{mean['allreduce_seconds']:>11.3f} {100 * mean['comm_fraction']:>6.1f}%")
    plain = seconds["4 x 1 rank"]
    for name in ("4 x 1 secagg", "4 x 1 sa+dp", "4 x 1 auth"):
        print(f"# {name} round time / plain FedAvg's: {seconds[name] / plain:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
