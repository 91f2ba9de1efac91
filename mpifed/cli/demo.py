"""`mpifed demo` (and `make demo`): write the digits set, train an MLP and a small convnet on 2
local ranks, print test accuracy; then split the digits non-IID over 4 institutions and compare
FedAvg, FedProx and centralised training round by round, with a FedAvg convnet beside them.

Needs no cluster and no GPU: MPI is the PyPI MPICH next to this Python, or the site's mpiexec
(Open MPI is told to oversubscribe: 4 ranks start on a 2-core machine).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .. import launch
from ..launch import mpifed_command
from .output import emit

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

# The convnet: the same digits as 1x8x8 images (the file's input_shape attribute).
CONVNET_MODEL = """\
[model]
kind = "sequential"
layers = [{type = "conv2d", out = 16, kernel = 3, padding = 1}, {type = "batchnorm2d"},
          {type = "relu"},
          {type = "conv2d", out = 32, kernel = 3, padding = 1}, {type = "batchnorm2d"},
          {type = "relu"}, {type = "maxpool2d", kernel = 2},
          {type = "conv2d", out = 32, kernel = 3, padding = 1}, {type = "batchnorm2d"},
          {type = "relu"}, {type = "maxpool2d", kernel = 2},
          {type = "flatten"}, {type = "dropout", p = 0.25}, {type = "linear", out = 10}]
"""

MLP_MODEL = """\
[model]
kind = "mlp"
hidden = [64]
"""

CONVNET = """\
[data]
train = "{data}/train.h5"
test = "{data}/test.h5"

{model}
[optim]
lr = 0.05
momentum = 0.9
weight_decay = 0.0005
batch_size = 16
epochs = 15
schedule = "cosine"
warmup = 20

[run]
seed = 0
out = "{out}/convnet"
log_every = 200
progress = "none"
"""


FEDERATED = """\
# The federated demo: digits split by Dirichlet(0.5) label skew over 4 institutions.
[data]
train = "{out}/sites/site-{{institution}}.h5"
test = "{data}/test.h5"

{model}

[optim]
lr = 0.05
momentum = 0.9
batch_size = 16

[federated]
institutions = 4
rounds = {rounds}
local_steps = {local_steps}
strategy = "fedavg"
mu = 0.1

[run]
seed = 0
out = "{out}/{name}"
progress = "none"
"""


CENTRAL = """\
# Centralised baseline: the pooled digits, 4 ranks, as many steps as the federation takes.
[data]
train = "{data}/train.h5"
test = "{data}/test.h5"

[model]
kind = "mlp"
hidden = [64]

[optim]
lr = 0.05
momentum = 0.9
batch_size = 16
steps = {steps}

[run]
seed = 0
out = "{out}/central"
eval_every = {every}
progress = "none"
"""


def run(cmd: list[str]) -> None:
    """Print `cmd` as a shell line, then run it; raise UserError with its stderr tail if it fails."""
    emit("$ " + " ".join(cmd))
    launch.run(cmd)


def main(out: str = "demo-out", ranks: int = 2) -> int:
    """Run the demo into the folder `out`; return 0 when the MLP reaches 0.95 test accuracy."""
    mpifed = mpifed_command()
    data = os.path.join(out, "data")
    run([*mpifed, "data", "digits", data])
    config = os.path.join(out, "digits.toml")
    Path(config).write_text(CONFIG.format(data=data, out=out))
    start = time.perf_counter()
    run([*mpifed_command(ranks), "train", config])
    wall = time.perf_counter() - start
    summary = json.loads(Path(out, "train", "metrics.jsonl").read_text().splitlines()[-1])
    emit(f"\ndemo: test accuracy {summary['accuracy']:.4f} on the digits test set, "
         f"{ranks} ranks, wall time {wall:.1f} s (training {summary['seconds']:.2f} s)")
    if summary["accuracy"] < 0.95:
        return 1
    convnet = os.path.join(out, "convnet.toml")
    Path(convnet).write_text(CONVNET.format(data=data, out=out, model=CONVNET_MODEL))
    start = time.perf_counter()
    run([*mpifed_command(ranks), "train", convnet])
    wall = time.perf_counter() - start
    cnn = json.loads(Path(out, "convnet", "metrics.jsonl").read_text().splitlines()[-1])
    emit(f"\ndemo: convnet test accuracy {cnn['accuracy']:.4f}, {ranks} ranks, wall time "
         f"{wall:.1f} s (training {cnn['seconds']:.2f} s)")
    if cnn["accuracy"] < 0.98:
        return 1
    federated_comparison(mpifed, data, out)
    emit("\n" + "\n".join(next_steps(os.path.join(out, "digits.toml"))))
    return 0


def next_steps(config: str) -> list[str]:
    """Return the lines that close the demo: where a new user goes from here."""
    return [
        "next steps:",
        "  your own data:  mpifed data from-numpy X.npy Y.npy mine.h5, then set data.train = "
        f"\"mine.h5\" in a copy of {config} and run: mpiexec -n 2 mpifed train mine.toml",
        "  from Python:    mpifed.train.run(config, data=(x, y), model=...) (docs/reference/api.md)",
        "  reference:      the docs (make docs; docs/index.md); every config key in "
        "docs/reference/configuration.md (or mpifed train --help)",
        "  under SLURM:    sbatch -n 8 jobs/train.sbatch mine.toml",
    ]


def accuracy_by_round(metrics: Path, event: str, every: int = 1) -> list[float]:
    """Return the test accuracy of each round (or each `every` steps) from a metrics file."""
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    if event == "round":
        return [r["accuracy"] for r in records if r.get("event") == "round"]
    return [r["accuracy"] for r in records if r.get("event") == "eval" and r["step"] % every == 0]


def federated_comparison(mpifed: list[str], data: str, out: str, rounds: int = 15,
                         local_steps: int = 10) -> None:
    """Train FedAvg, FedProx and centralised MLPs and a FedAvg convnet on 4 ranks; print
    accuracy by round side by side."""
    run([*mpifed, "data", "partition", os.path.join(data, "train.h5"),
         os.path.join(out, "sites"), "--institutions", "4", "--scheme", "dirichlet",
         "--alpha", "0.5", "--seed", "0"])
    four = {}
    for name, model in (("fedavg", MLP_MODEL), ("fedavg-convnet", CONVNET_MODEL)):
        config = os.path.join(out, f"{name}.toml")
        Path(config).write_text(FEDERATED.format(data=data, out=out, rounds=rounds,
                                                 local_steps=local_steps, model=model,
                                                 name=name))
        four[name] = [*mpifed_command(4), "train", config]
        run(four[name])
    run([*four["fedavg"], "--set", "federated.strategy=fedprox", "--set",
         f"run.out={out}/fedprox"])
    central = os.path.join(out, "central.toml")
    Path(central).write_text(CENTRAL.format(data=data, out=out, steps=rounds * local_steps,
                                            every=local_steps))
    run([*mpifed_command(4), "train", central])
    table = {
        "centralised": accuracy_by_round(Path(out, "central", "metrics.jsonl"), "eval",
                                         local_steps),
        "fedavg": accuracy_by_round(Path(out, "fedavg", "metrics.jsonl"), "round"),
        "fedprox": accuracy_by_round(Path(out, "fedprox", "metrics.jsonl"), "round"),
        "fedavg-convnet": accuracy_by_round(Path(out, "fedavg-convnet", "metrics.jsonl"),
                                            "round"),
    }
    emit(f"\ntest accuracy by round: digits, 4 institutions, Dirichlet(0.5) label skew, "
         f"{local_steps} local steps of batch 16 per round (centralised: the same steps on the "
         "pooled data, 4 ranks; the MLP but for fedavg-convnet, FedAvg of the small convnet)")
    emit(f"{'round':>5} " + " ".join(f"{name:>14}" for name in table))
    for i in range(rounds):
        emit(f"{i + 1:>5} " + " ".join(f"{acc[i]:>14.4f}" for acc in table.values()))

