"""`make demo`: write the digits set, train an MLP on 2 local ranks, print test accuracy.

Needs no cluster and no GPU: MPI is the PyPI MPICH next to this Python.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

CONFIG = """\
# The demo run: an MLP on scikit-learn's handwritten digits, data-parallel over 2 ranks.
[data]
train = "{data}/train.h5"
test = "{data}/test.h5"

[model]
kind = "mlp"
hidden = [64]

[optim]
name = "sgd"
lr = 0.1
momentum = 0.9
batch_size = 16      # per rank: the global batch is 32
epochs = 20
schedule = "cosine"
warmup = 20

[run]
seed = 0
out = "{out}/train"
log_every = 100
"""


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else "mpiexec"


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def main(out: str = "demo-out", ranks: int = 2) -> int:
    mpifed = [sys.executable, "-m", "mpifed"]
    data = os.path.join(out, "data")
    run([*mpifed, "data", "digits", data])
    config = os.path.join(out, "digits.toml")
    Path(config).write_text(CONFIG.format(data=data, out=out))
    start = time.perf_counter()
    run([mpiexec(), "-n", str(ranks), *mpifed, "train", config])
    wall = time.perf_counter() - start
    summary = json.loads(Path(out, "train", "metrics.jsonl").read_text().splitlines()[-1])
    print(f"\ndemo: test accuracy {summary['accuracy']:.4f} on the digits test set, "
          f"{ranks} ranks, wall time {wall:.1f} s (training {summary['seconds']:.2f} s)")
    return 0 if summary["accuracy"] >= 0.95 else 1


if __name__ == "__main__":
    raise SystemExit(main())
