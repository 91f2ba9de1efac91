"""The scaling suite: strong and weak scaling of training over 1, 2, 4 ranks, the alpha-beta
model's predictions up to 1024 ranks beside them, CSV + JSON out, and PNG plots.

    python bench/scaling.py [--ranks 1 2 4] [--steps 100] [--out bench-out/scaling]
    mpifed bench suite [...]                                 (the same)

Each point is `mpifed bench scaling` under this machine's mpiexec (on a cluster, use
jobs/scaling.sbatch, then `mpiexec -n 2 mpifed bench model --scaling-csv ...`). Writes
OUT/scaling.csv, OUT/model.json, OUT/scaling.json, and with matplotlib OUT/*.png
(`mpifed plot OUT/scaling.json`).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
from pathlib import Path

from ..launch import mpifed_command
from .mlp import CLASSES, FEATURES


def mpiexec(ranks: int, *args: str, env=None) -> None:
    """Run `mpifed ARGS` on `ranks` ranks under this machine's mpiexec; raise if it fails."""
    subprocess.run([*mpifed_command(ranks), *args], check=True, env=env)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128, help="weak: per rank; strong: global")
    parser.add_argument("--strong-batch", type=int, default=512, help="strong: global batch")
    parser.add_argument("--out", default="bench-out/scaling")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, table = out / "bench.h5", out / "scaling.csv"
    if not data.exists():
        subprocess.run([*mpifed_command(), "data", "synth", str(data), "--samples", "65536",
                        "--features", str(FEATURES), "--classes", str(CLASSES)], check=True)
    if table.exists():
        table.unlink()
    env = dict(os.environ, MPIFED_BLAS_THREADS="1", OMP_NUM_THREADS="1")
    for mode, batch in (("weak", args.batch), ("strong", args.strong_batch)):
        for ranks in args.ranks:
            print(f"# {mode} scaling, {ranks} ranks", flush=True)
            mpiexec(ranks, "bench", "scaling", "--mode", mode, "--batch", str(batch), "--steps",
                    str(args.steps), "--data", str(data), "--csv", str(table), env=env)
    mpiexec(2, "bench", "model", "--scaling-csv", str(table), "--json", str(out / "model.json"),
            "--ranks-per-node", "2")
    with open(table) as fh:
        rows = list(csv.DictReader(fh))
    combined = {"rows": rows, "model": json.loads((out / "model.json").read_text())}
    (out / "scaling.json").write_text(json.dumps(combined, indent=1))
    print(f"# wrote {table}, {out / 'scaling.json'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("# matplotlib not installed: pip install 'mpifed[plot]' for the PNG plots")
        return 0
    subprocess.run([*mpifed_command(), "plot", str(out / "scaling.json"),
                    "--out", str(out)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
