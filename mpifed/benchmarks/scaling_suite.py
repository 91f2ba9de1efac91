"""The scaling suite: strong and weak scaling of training over 1, 2, 4 ranks, the alpha-beta
model's predictions up to 1024 ranks beside them, CSV + JSON out, and PNG plots.

    python bench/scaling.py [--ranks 1 2 4] [--steps 100] [--out bench-out/scaling]
    mpifed bench suite [...]                                 (the same)

Each point is `mpifed bench scaling` under this machine's mpiexec (on a cluster, use
jobs/scaling.sbatch, then `mpiexec -n 2 mpifed bench model --scaling-csv ...`). Writes
OUT/scaling.csv, OUT/model.json, OUT/scaling.json, and with matplotlib OUT/*.png
(`mpifed plot OUT/scaling.json`).

Several nodes, emulated on this host: MPICH splits the ranks into nodes (MPIR_CVAR_NUM_CLIQUES,
block placement), shared memory inside a node, libfabric's TCP provider over the loopback
interface between nodes (mpifed.launch.emulated_nodes_env). --multinode NODESxRANKS adds weak
scaling points so configured (default 2x2); --sweeps runs `mpifed bench allreduce` on each
configuration (default 1x2 2x1 2x2 4x1), fits the two-level model on 1x2 and 2x1 and predicts
the others (OUT/heldout.json); the model's weak efficiency of each multi-node point is written
beside the measured one. On a busy 2-core machine 2x2 and 4x1 oversubscribe the cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path

from .. import launch
from ..launch import emulated_nodes_env, mpifed_command
from .mlp import CLASSES, FEATURES, GRAD_BYTES


def mpiexec(ranks: int, *args: str, env=None) -> None:
    """Run `mpifed ARGS` on `ranks` ranks under this machine's mpiexec; raise if it fails."""
    launch.run([*mpifed_command(ranks), *args], check=True, env=env)


def parse_config(text: str) -> tuple[int, int]:
    """Parse 'NODESxRANKS' ('2x2': 2 nodes of 2 ranks) into (nodes, ranks per node)."""
    nodes, _, per_node = text.lower().partition("x")
    try:
        return int(nodes), int(per_node)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NODESxRANKS, e.g. 2x2") from None


def sweep(out: Path, config: tuple[int, int], env: dict, max_bytes: str) -> Path:
    """Run the all-reduce sweep on one configuration with ordinary arrays; return its JSON."""
    nodes, per_node = config
    path = out / f"allreduce-{nodes}x{per_node}.json"
    print(f"# all-reduce sweep, {nodes} node(s) x {per_node} rank(s)", flush=True)
    mpiexec(nodes * per_node, "bench", "allreduce", "--nodes", str(nodes), "--arrays",
            "ordinary", "-b", "4K", "-e", max_bytes, "-f", "4", "-n", "10", "--json", str(path),
            env={**env, **emulated_nodes_env(nodes, ranks=nodes * per_node)})
    return path


def heldout(out: Path, paths: dict) -> dict | None:
    """Fit on 1x2 and 2x1, predict the others: print the table, return OUT/heldout.json's data."""
    fit = [str(paths[c]) for c in ((1, 2), (2, 1)) if c in paths]
    rest = [str(p) for c, p in paths.items() if c not in ((1, 2), (2, 1))]
    if len(fit) < 2 or not rest:
        return None
    launch.run([*mpifed_command(), "bench", "model", "--fit", *fit, "--predict", *rest,
                    "--json", str(out / "heldout.json")], check=True)
    return json.loads((out / "heldout.json").read_text())


def predicted_weak(model: dict, compute: float | None, nodes: int, per_node: int) -> dict:
    """Return the two-level model's all-reduce seconds and weak efficiency of the MLP's step."""
    from .costmodel import TwoLevelModel

    two = TwoLevelModel.from_json(model)  # gradients live in the window; nodes share one host
    seconds = two.predict("hierarchical", nodes, per_node, GRAD_BYTES, "window", nodes * per_node)
    eff = compute / (compute + seconds) if compute else None
    return {"nodes": nodes, "ranks_per_node": per_node, "ranks": nodes * per_node,
            "allreduce_seconds": seconds, "efficiency": eff}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench suite", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch", type=int, default=128, help="weak: per rank; strong: global")
    parser.add_argument("--strong-batch", type=int, default=512, help="strong: global batch")
    parser.add_argument("--out", default="bench-out/scaling")
    parser.add_argument("--multinode", type=parse_config, nargs="*", default=[(2, 2)],
                        metavar="NODESxRANKS", help="weak scaling points on emulated nodes")
    parser.add_argument("--sweeps", type=parse_config, nargs="*",
                        default=[(1, 2), (2, 1), (2, 2), (4, 1)], metavar="NODESxRANKS",
                        help="all-reduce sweeps for the held-out model check (none: skip)")
    parser.add_argument("--sweep-max", default="16M", help="largest sweep size (default 16M)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, table = out / "bench.h5", out / "scaling.csv"
    if not data.exists():
        launch.run([*mpifed_command(), "data", "synth", str(data), "--samples", "65536",
                        "--features", str(FEATURES), "--classes", str(CLASSES)], check=True)
    if table.exists():
        table.unlink()
    env = dict(os.environ, MPIFED_BLAS_THREADS="1", OMP_NUM_THREADS="1")
    for mode, batch in (("weak", args.batch), ("strong", args.strong_batch)):
        for ranks in args.ranks:
            print(f"# {mode} scaling, {ranks} ranks", flush=True)
            mpiexec(ranks, "bench", "scaling", "--mode", mode, "--batch", str(batch), "--steps",
                    str(args.steps), "--data", str(data), "--csv", str(table), env=env)
    for nodes, per_node in args.multinode:
        print(f"# weak scaling, {nodes} nodes x {per_node} ranks (TCP over loopback)", flush=True)
        mpiexec(nodes * per_node, "bench", "scaling", "--mode", "weak", "--batch",
                str(args.batch), "--steps", str(args.steps), "--data", str(data), "--csv",
                str(table), env={**env, **emulated_nodes_env(nodes, ranks=nodes * per_node)})
    mpiexec(2, "bench", "model", "--scaling-csv", str(table), "--json", str(out / "model.json"),
            "--ranks-per-node", "2")
    paths = {c: sweep(out, c, env, args.sweep_max) for c in args.sweeps}
    two_level = heldout(out, paths)
    with open(table) as fh:
        rows = list(csv.DictReader(fh))
    combined = {"rows": rows, "model": json.loads((out / "model.json").read_text()),
                "emulation": "MPICH MPIR_CVAR_NUM_CLIQUES nodes on one host; TCP (libfabric "
                             "tcp provider) over loopback between nodes, shared memory inside"}
    if two_level:
        compute = combined["model"].get("compute_seconds")
        combined["heldout"] = two_level
        combined["multinode_predictions"] = [
            predicted_weak(two_level, compute, n, L) for n, L in args.multinode]
    (out / "scaling.json").write_text(json.dumps(combined, indent=1))
    print(f"# wrote {table}, {out / 'scaling.json'}")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("# matplotlib not installed: pip install 'mpifed[plot]' for the PNG plots")
        return 0
    launch.run([*mpifed_command(), "plot", str(out / "scaling.json"), "--allreduce",
                    *map(str, paths.values()), "--out", str(out)], check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
