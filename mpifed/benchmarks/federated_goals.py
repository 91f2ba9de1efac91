"""Issue 28's goals for robust and personalised federations, measured as users run them.

    python bench/federated_goals.py [--goal robust|personal|cost|all] [--rounds 20] [--quick]

robust: 5 institutions of one rank (IID rows of a synthetic 10-class set, an MLP), one of them
    Byzantine (MPIFED_FAULT=byzantine:3:scale:100, :signflip, :signflip:10; --modes): the test
    accuracy of FedAvg, FedMedian, FedTrimmedAvg, Krum and Multi-Krum beside clean FedAvg's;
    Bulyan on 11 institutions with 2 bad (byzantine:3,7) beside clean FedAvg on the same 11.
personal: a Dirichlet(0.1) label split over 5 institutions, each with its own held-out rows
    (data.test = "test-{institution}.h5", same label mix as its training rows): the mean and the
    worst per-institution accuracy of the global FedAvg model, FedPer (the head local), Ditto,
    and FedPer with 20 fine-tuning steps.
cost: the median round time of each robust rule over FedAvg's at 11 institutions (11 ranks; on
    a machine with fewer cores they are oversubscribed, and the ratio is what to read), and
    the root's aggregation alone on 11 models of the benchmark MLP's size (mlp.py), in process.
Every figure comes from the runs' own metrics.jsonl; each table's baseline runs in the same call.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from ..data.partition import dirichlet_split
from ..federated.strategies import STRATEGIES, ServerHyper
from ..launch import mpifed_command
from .harness import Column, print_table
from .mlp import FEATURES as MLP_FEATURES
from .mlp import NAME, PARAMETERS, model_toml

FEATURES, CLASSES, HIDDEN = 20, 10, 32
OVERLAP = 3.0  # personal: classes overlap more, so one global model cannot fit every site
ROBUST = {"fedmedian": {}, "fedtrimmedavg": {"trim_fraction": 0.2},
          "krum": {"num_malicious": 1}, "multikrum": {"num_malicious": 1, "num_selected": 3}}
PERSONAL = {"fedavg (global)": {},
            "fedper": {"personalization": "fedper", "personal_layers": [3]},
            "ditto": {"personalization": "ditto", "ditto_lambda": 0.1},
            "fedper + finetune": {"personalization": "fedper", "personal_layers": [3],
                                  "finetune_steps": 20}}


def blobs(samples: int, seed: int, spread: float = 1.6, features: int = FEATURES):
    """Return (x (samples, features) float32, y (samples,)): Gaussian classes around fixed
    centres (seed 0), rows drawn from `seed`; overlapping enough that accuracy is not 100%."""
    centres = np.random.default_rng(0).normal(0.0, 1.0, (CLASSES, features))
    rng = np.random.default_rng(seed)
    y = rng.integers(0, CLASSES, samples)
    x = centres[y] + spread * rng.normal(0.0, 1.0, (samples, features)) / np.sqrt(features) * 3
    return x.astype(np.float32), y.astype(np.int64)


def write(path, x, y) -> None:
    with h5py.File(path, "w") as fh:
        fh.create_dataset("x", data=x)
        fh.create_dataset("y", data=y)
        fh.attrs["num_classes"] = CLASSES


SMALL_MODEL = f'[model]\nkind = "mlp"\nhidden = [{HIDDEN}]\n'


def toml(institutions: int, rounds: int, steps: int, out: str, test: str, federated: dict,
         model: str = SMALL_MODEL) -> str:
    """Return a federation's config: the synthetic sites in the config's folder, an MLP."""
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in federated.items())
    return (f'[data]\ntrain = "site-{{institution}}.h5"\ntest = "{test}"\n'
            f"{model}"
            f"[optim]\nlr = 0.1\nbatch_size = 16\n"
            f"[federated]\ninstitutions = {institutions}\nrounds = {rounds}\n"
            f"local_steps = {steps}\n{extra}"
            f'[run]\nout = "{out}"\nprogress = "none"\nseed = 1\n')


def run(folder: str, name: str, institutions: int, rounds: int, steps: int, test: str,
        federated: dict, fault: str | None = None, model: str = SMALL_MODEL) -> list[dict]:
    """Run one federation in `folder` (its sites already written); return its round records
    and summary."""
    out = os.path.join(folder, f"out-{name}")
    config = os.path.join(folder, f"{name}.toml")
    Path(config).write_text(toml(institutions, rounds, steps, out, test, federated, model))
    env = dict(os.environ, OMP_NUM_THREADS="1", MPIFED_BLAS_THREADS="1")
    env.pop("MPIFED_FAULT", None)
    if fault:
        env["MPIFED_FAULT"] = fault
    done = subprocess.run([*mpifed_command(institutions), "train", config], cwd=folder,
                          capture_output=True, text=True, env=env)
    if done.returncode:
        raise RuntimeError(f"{name}: mpifed train failed:\n{done.stderr[-2000:]}")
    with open(os.path.join(out, "metrics.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def iid_sites(folder: str, institutions: int, rows: int, features: int = FEATURES) -> None:
    """Write IID sites and one pooled test set into `folder`."""
    os.makedirs(folder, exist_ok=True)
    for k in range(institutions):
        write(os.path.join(folder, f"site-{k}.h5"), *blobs(rows, 100 + k, features=features))
    write(os.path.join(folder, "test.h5"), *blobs(3000, 99, features=features))


def robust_goal(tmp: str, rounds: int, steps: int, rows: int, modes: list[str]) -> list[dict]:
    """Rows of the robust table: each rule's accuracy with one bad institution of 5 (and
    Bulyan's with 2 of 11), beside clean FedAvg's in the same layout."""
    table = []
    five, eleven = os.path.join(tmp, "five"), os.path.join(tmp, "eleven")
    iid_sites(five, 5, rows)
    clean = run(five, "clean", 5, rounds, steps, "test.h5", {})[-1]["accuracy"]
    table.append({"case": "5 institutions, clean", "rule": "fedavg", "accuracy": clean,
                  "clean": clean})
    print(format_robust(table[-1]), flush=True)
    for mode in modes:
        fault = f"byzantine:3:{mode}"
        for rule, extra in [("fedavg", {}), *ROBUST.items()]:
            got = run(five, f"{rule}-{mode.replace(':', '')}", 5, rounds, steps, "test.h5",
                      {"strategy": rule, **extra}, fault)[-1]["accuracy"]
            table.append({"case": f"5, {fault}", "rule": rule, "accuracy": got, "clean": clean})
            print(format_robust(table[-1]), flush=True)
    iid_sites(eleven, 11, rows)
    clean11 = run(eleven, "clean", 11, rounds, steps, "test.h5", {})[-1]["accuracy"]
    table.append({"case": "11 institutions, clean", "rule": "fedavg", "accuracy": clean11,
                  "clean": clean11})
    print(format_robust(table[-1]), flush=True)
    for mode in modes:
        fault = f"byzantine:3,7:{mode}"
        for rule, extra in [("fedavg", {}), ("bulyan", {"num_malicious": 2})]:
            got = run(eleven, f"{rule}-{mode.replace(':', '')}", 11, rounds, steps, "test.h5",
                      {"strategy": rule, **extra}, fault)[-1]["accuracy"]
            table.append({"case": f"11, {fault}", "rule": rule, "accuracy": got,
                          "clean": clean11})
            print(format_robust(table[-1]), flush=True)
    return table


def format_robust(row: dict) -> str:
    drop = 100 * (row["clean"] - row["accuracy"])
    return f"  {row['case']:<28} {row['rule']:<14} {100 * row['accuracy']:6.1f}% {drop:+7.1f}"


def dirichlet_sites(folder: str, institutions: int, rows: int, alpha: float) -> None:
    """Split a pooled synthetic set by Dirichlet(alpha) labels; each site's rows 80/20 into its
    training file and its own test file."""
    os.makedirs(folder, exist_ok=True)
    x, y = blobs(rows * institutions, 7, spread=OVERLAP)
    parts = dirichlet_split(y, institutions, alpha, np.random.default_rng(3), min_size=40)
    for k, part in enumerate(parts):
        part = np.random.default_rng(k).permutation(part)
        cut = int(0.8 * len(part))
        write(os.path.join(folder, f"site-{k}.h5"), x[part[:cut]], y[part[:cut]])
        write(os.path.join(folder, f"test-{k}.h5"), x[part[cut:]], y[part[cut:]])


def personal_goal(tmp: str, rounds: int, steps: int, rows: int) -> list[dict]:
    """Rows of the personalisation table: mean and worst per-institution accuracy."""
    folder = os.path.join(tmp, "dirichlet")
    dirichlet_sites(folder, 5, rows, 0.1)
    table = []
    for name, extra in PERSONAL.items():
        summary = run(folder, name.split()[0] + str(len(table)), 5, rounds, steps,
                      "test-{institution}.h5", extra)[-1]
        table.append({"rule": name, "mean": summary["local_accuracy_mean"],
                      "worst": summary["local_accuracy_worst"]})
    base = table[0]["mean"]
    for row in table:
        row["gain"] = row["mean"] - base
    return table


def cost_goal(tmp: str, rounds: int, steps: int, rows: int, large: bool) -> list[dict]:
    """Rows of the cost table: median round time of each rule over FedAvg's, 11 institutions;
    large: the benchmark MLP 784-512-256-10 (mlp.py) on 784 features, else the small MLP."""
    folder = os.path.join(tmp, "cost")
    iid_sites(folder, 11, rows, features=MLP_FEATURES if large else FEATURES)
    model = model_toml() if large else SMALL_MODEL
    rules = {"fedavg": {}, **ROBUST, "bulyan": {"num_malicious": 2}}
    seconds = {}
    for rule, extra in rules.items():
        records = run(folder, rule, 11, rounds, steps, "", {"strategy": rule, **extra},
                      model=model)
        timed = [r["round_seconds"] for r in records if r.get("event") == "round"][2:]
        seconds[rule] = float(np.median(timed))
    alone = aggregation_seconds(rules, 11)
    return [{"rule": r, "seconds": s, "ratio": s / seconds["fedavg"], "alone": alone[r],
             "alone_ratio": alone[r] / alone["fedavg"]} for r, s in seconds.items()]


def aggregation_seconds(rules: dict, institutions: int, size: int = PARAMETERS,
                        repeats: int = 5) -> dict:
    """Return each rule's median seconds to aggregate `institutions` float32 models of `size`
    parameters (the benchmark MLP's count), timed alone in this process: the root's share of
    a round, where Krum's pairwise distances grow with the square of the institutions."""
    rng = np.random.default_rng(0)
    start = rng.normal(size=size).astype(np.float32)
    results = [(start + rng.normal(0, 0.01, size).astype(np.float32), 100 + k, 10, 1.0)
               for k in range(institutions)]
    out = {}
    for rule, extra in rules.items():
        hyper = ServerHyper(1.0, 0.9, 0.99, 1e-3, extra.get("trim_fraction", 0.2),
                            extra.get("num_malicious", 0), extra.get("num_selected", 0), 0.2)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            STRATEGIES[rule](start, results, {}, hyper)
            times.append(time.perf_counter() - t0)
        out[rule] = float(np.median(times))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python bench/federated_goals.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--goal", choices=("robust", "personal", "cost", "all"), default="all")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=400, help="training rows per institution")
    parser.add_argument("--quick", action="store_true", help="6 rounds of 5 steps, 200 rows")
    parser.add_argument("--modes", default="scale:100,signflip,signflip:10",
                        help="robust: the MPIFED_FAULT byzantine modes, comma-separated "
                             "(default %(default)s)")
    parser.add_argument("--large", action="store_true",
                        help=f"cost: time the rounds of the benchmark {NAME} (mlp.py)")
    args = parser.parse_args(argv)
    rounds, steps, rows = (6, 5, 200) if args.quick else (args.rounds, args.local_steps,
                                                          args.rows)
    goals = ("robust", "personal", "cost") if args.goal == "all" else (args.goal,)
    print(f"# federated goals: synthetic {CLASSES}-class blobs, {FEATURES} features, MLP "
          f"[{HIDDEN}], {rounds} rounds x {steps} local steps, {rows} rows per institution")
    with tempfile.TemporaryDirectory() as tmp:
        if "robust" in goals:
            print("# robust: case, rule, test accuracy, its drop from clean FedAvg (points)")
            robust_goal(tmp, rounds, steps, rows, args.modes.split(","))
        if "personal" in goals:
            print_table(PERSONAL_COLUMNS, personal_goal(tmp, rounds, steps, rows),
                        "personal: Dirichlet(0.1) over 5 institutions, each on its own test rows")
        if "cost" in goals:
            which = NAME if args.large else f"MLP [{HIDDEN}]"
            print_table(COST_COLUMNS, cost_goal(tmp, rounds, steps, rows, args.large),
                        f"cost: median round time at 11 institutions (rounds 3 on) of {which}; "
                        f"aggregation alone of 11 models of {PARAMETERS:,} float32")
    return 0


PERSONAL_COLUMNS = [
    Column("model", 18, lambda r: r["rule"], "<"),
    Column("mean acc", 9, lambda r: f"{100 * r['mean']:.1f}%"),
    Column("worst acc", 9, lambda r: f"{100 * r['worst']:.1f}%"),
    Column("vs global", 9, lambda r: f"{100 * r['gain']:+.1f}"),
]
COST_COLUMNS = [
    Column("rule", 14, lambda r: r["rule"], "<"),
    Column("round s", 9, lambda r: f"{r['seconds']:.4f}"),
    Column("/ fedavg", 9, lambda r: f"{r['ratio']:.2f}x"),
    Column("aggregate s", 11, lambda r: f"{r['alone']:.4f}"),
    Column("/ fedavg", 9, lambda r: f"{r['alone_ratio']:.2f}x"),
]


if __name__ == "__main__":
    raise SystemExit(main())
