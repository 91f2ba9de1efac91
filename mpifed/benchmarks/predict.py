"""Predict all-reduce time and weak-scaling efficiency at rank counts this machine cannot run.

    mpiexec -n 2 mpifed bench model --scaling-csv scaling.csv [--ranks-per-node 4]

Held-out check of the two-level model (no MPI needed): fit alpha and beta of the link inside a
node and of the link between nodes from all-reduce sweeps (`mpifed bench allreduce --json`),
then predict the sweeps of other configurations and print predicted against measured:

    mpifed bench model --fit 1x2.json 2x1.json --predict 2x2.json 4x1.json [--json out.json]

The fit uses the ring's times (alpha, and beta at each buffer size): on one node of 2 ranks for
the intra-node link, on 2 nodes of 1 rank for the inter-node link; and the one-node sweep's
hierarchical times for the host's memory bandwidth per size (costmodel.TwoLevelModel).

Measures alpha, beta (ping-pong between ranks 0 and 1) and gamma (a float32 add) in this run,
takes the compute time of one step from the 1-rank weak-scaling row of the CSV (or
--compute-seconds), and prints, for 1 to 1024 ranks, the predicted all-reduce time of the
gradients (flat ring, and hierarchical with --ranks-per-node ranks per node) and the predicted
efficiency, beside the efficiency measured where the CSV has that rank count. Run it across two
nodes (srun -N 2 -n 2 ...) to get the interconnect's alpha and beta instead of shared memory's.
"""

from __future__ import annotations

import argparse
import csv
import json

import numpy as np
from mpi4py import MPI

from .costmodel import (
    LATENCY_BYTES,
    CostModel,
    Memory,
    TwoLevelModel,
    fit_sized_link,
    measure,
    node_bytes,
)
from .membw import node_copy_bandwidth
from .mlp import GRAD_BYTES


def predictions(model: CostModel, compute: float, nbytes: float, per_node: int,
                node_bandwidth: float, ranks_list) -> list[dict]:
    """Return one row per rank count: predicted all-reduce seconds and efficiencies."""
    rows = []
    for ranks in ranks_list:
        nodes = max(1, ranks // per_node)
        local = min(ranks, per_node)
        intra = 2 * local * nbytes / node_bandwidth if local > 1 else 0.0  # the memory bound
        ring = model.ring(ranks, nbytes)
        hier = model.hierarchical(nodes, local, nbytes, intra)
        rows.append({"ranks": ranks, "nodes": nodes, "ring_seconds": ring,
                     "hierarchical_seconds": hier,
                     "ring_efficiency": model.weak_efficiency(compute, ring),
                     "hierarchical_efficiency": model.weak_efficiency(compute, hier)})
    return rows


def measured_efficiency(path: str | None) -> tuple[dict, float | None]:
    """Return ({ranks: weak efficiency}, compute seconds of the 1-rank step) from a scaling CSV."""
    if not path:
        return {}, None
    with open(path) as fh:
        rows = [r for r in csv.DictReader(fh) if r["mode"] == "weak"]
    effs = {int(r["ranks"]): float(r["efficiency"]) for r in rows if r["efficiency"]}
    base = [r for r in rows if r["ranks"] == "1"]
    compute = None
    if base:
        r = base[-1]
        compute = float(r["step_seconds"]) * (1 - float(r["comm_fraction"]))
    return effs, compute


HELD_OUT_ALGOS = ("ring", "hierarchical")


def _config(result: dict) -> tuple[int, int]:
    """Return (nodes, ranks per node) of an all-reduce sweep's JSON."""
    meta = result["meta"]
    nodes = int(meta.get("nodes", 1))
    return nodes, int(meta.get("ranks_per_node", meta["ranks"] // nodes))


def host_ranks(meta: dict) -> int:
    """Return how many ranks share one host's memory in a sweep (all, if nodes are emulated)."""
    nodes = int(meta.get("nodes", 1))
    emulated = nodes == 1 or "emulated" in str(meta.get("transport", ""))
    return int(meta["ranks"]) if emulated else int(meta.get("ranks_per_node", 1))


def fit_memory(result: dict) -> Memory:
    """Fit the host's memory bandwidth per size on a one-node sweep's hierarchical times.

    On one node the hierarchical all-reduce is nothing but memory passes (node_bytes) and two
    fences: T = fixed + R * node_bytes / B. A least-squares line over every size (relative
    error) gives the fixed cost; B at each size is R * node_bytes / (T - fixed) wherever the
    bytes take at least the fixed cost. Without such sizes: the node copy bandwidth of the
    sweep's header.
    """
    meta = result["meta"]
    per_node, arrays, host = int(meta["ranks"]), meta.get("arrays", "ordinary"), host_ranks(meta)
    rows = [(r["size"], r["hierarchical"]["time_us"] * 1e-6) for r in result["rows"]]
    moved = [host * node_bytes(1, per_node, s, arrays) for s, _ in rows]
    times = np.array([t for _, t in rows])
    design = np.stack([np.ones_like(times), np.array(moved, dtype=float)], axis=1) / times[:, None]
    fixed = max(float(np.linalg.lstsq(design, np.ones_like(times), rcond=None)[0][0]), 0.0)
    curve = tuple((float(s), m / (t - fixed)) for (s, t), m in zip(rows, moved)
                  if s > LATENCY_BYTES and t >= 2 * fixed)
    if not curve:
        if not meta.get("node_bandwidth"):
            raise ValueError("the one-node sweep has neither large sizes nor a node bandwidth")
        curve = ((1.0, float(meta["node_bandwidth"])),)
    return Memory(curve, fixed)


def fit_two_level(results: list[dict], min_bytes: int = 0) -> TwoLevelModel:
    """Fit the intra-node link and the host's memory on a one-node sweep, the inter-node link
    on a sweep of one rank per node.

    results: JSON of `mpifed bench allreduce`; the ring's median time at each size >= min_bytes
    gives each link's alpha and beta per size (fit_sized_link); the one-node sweep's
    hierarchical times give the memory bandwidth per size (fit_memory).
    """
    links, memory = {}, None
    for result in results:
        nodes, per_node = _config(result)
        kind = "intra" if nodes == 1 else "inter" if per_node == 1 else None
        if kind is None:
            raise ValueError(f"fit on one node or on one rank per node, not {nodes}x{per_node}")
        rows = [r for r in result["rows"] if r["size"] >= min_bytes]
        links[kind] = fit_sized_link([r["size"] for r in rows],
                                     [r["ring"]["time_us"] * 1e-6 for r in rows],
                                     nodes * per_node)
        if kind == "intra" and per_node > 1 and all("hierarchical" in r for r in rows):
            memory = fit_memory({"meta": result["meta"], "rows": rows})
    missing = {"intra", "inter"} - set(links)
    if missing:
        raise ValueError(f"no sweep to fit the {', '.join(sorted(missing))}-node link on")
    return TwoLevelModel(links["intra"], links["inter"], memory)


def held_out_rows(model: TwoLevelModel, result: dict) -> list[dict]:
    """Return predicted against measured seconds per size and algorithm for one sweep."""
    nodes, per_node = _config(result)
    arrays = result["meta"].get("arrays")
    config = f"{nodes}x{per_node}" + (f" {arrays}" if arrays else "")
    host = host_ranks(result["meta"])
    out = []
    for row in result["rows"]:
        for algo in HELD_OUT_ALGOS:
            measured = row[algo]["time_us"] * 1e-6
            predicted = model.predict(algo, nodes, per_node, row["size"], arrays or "window",
                                      host)
            out.append({"config": config, "algorithm": algo, "size": row["size"],
                        "predicted_s": predicted, "measured_s": measured,
                        "error": predicted / measured - 1})
    return out


def _gbs(seconds_per_byte: float) -> str:
    return f"{1 / max(seconds_per_byte, 1e-30) / 1e9:.2f}"


def describe(model: TwoLevelModel, fit: list[dict]) -> list[str]:
    """Return the fitted parameters as comment lines (bandwidth per buffer size)."""
    lines = []
    for name, link in (("intra-node", model.intra), ("inter-node", model.inter)):
        per_size = ", ".join(f"{_size(s)} {_gbs(b)}" for s, b in link.curve) or _gbs(link.beta)
        lines.append(f"# {name} link: alpha {link.alpha * 1e6:.1f} us; 1/beta by buffer size, "
                     f"GB/s: {per_size}")
    if model.memory is not None:
        per_size = ", ".join(f"{_size(s)} {b / 1e9:.1f}" for s, b in model.memory.curve)
        header = [r["meta"].get("node_bandwidth") for r in fit if r["meta"].get("node_bandwidth")]
        seen = f"; node copy bandwidth in the sweep's header: {header[0] / 1e9:.1f} GB/s" \
            if header else ""
        lines.append(f"# host memory (one-node hierarchical): fixed {model.memory.fixed * 1e6:.1f}"
                     f" us; GB/s by buffer size: {per_size}{seen}")
    return lines


def _size(nbytes: float) -> str:
    for unit, shift in (("MiB", 20), ("KiB", 10)):
        if nbytes >= 1 << shift:
            return f"{nbytes / (1 << shift):g} {unit}"
    return f"{nbytes:g} B"


def held_out_main(args) -> int:
    """Fit on --fit sweeps, predict the --predict sweeps, print the table (no MPI)."""
    def load(path):
        with open(path) as fh:
            return json.load(fh)

    fit = [load(p) for p in args.fit]
    model = fit_two_level(fit)
    print(f"# fit on {', '.join(args.fit)}")
    print("\n".join(describe(model, fit)))
    print(f"# {'config':>12} {'algorithm':>12} {'size':>10} {'predicted us':>13} "
          f"{'measured us':>12} {'error':>7}")
    rows = []
    for path in args.predict:
        rows += held_out_rows(model, load(path))
    for r in rows:
        print(f"  {r['config']:>12} {r['algorithm']:>12} {r['size']:>10} "
              f"{r['predicted_s'] * 1e6:>13.1f} {r['measured_s'] * 1e6:>12.1f} "
              f"{100 * r['error']:>+6.0f}%")
    big = [abs(r["error"]) for r in rows if r["size"] >= 1 << 20]
    if big:
        print(f"# worst |error| at >= 1 MiB: {100 * max(big):.0f}% (goal: 20%)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**model.to_json(), "fit": args.fit, "rows": rows}, fh, indent=1)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench model", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scaling-csv", help="a CSV from jobs/scaling.sbatch or bench/scaling.py")
    parser.add_argument("--compute-seconds", type=float, help="compute time of one step")
    parser.add_argument("--grad-bytes", type=float, default=GRAD_BYTES,
                        help=f"bytes all-reduced per step (default {GRAD_BYTES:,}: the MLP)")
    parser.add_argument("--ranks-per-node", type=int, default=4)
    parser.add_argument("--json", metavar="PATH", help="write model and predictions as JSON")
    parser.add_argument("--fit", nargs="+", metavar="JSON",
                        help="all-reduce sweeps to fit the two links on (one node; 1 rank/node)")
    parser.add_argument("--predict", nargs="+", metavar="JSON", default=[],
                        help="all-reduce sweeps of held-out configurations to predict")
    args = parser.parse_args(argv)
    if args.fit:
        return held_out_main(args)
    comm = MPI.COMM_WORLD
    if comm.size < 2:
        if comm.rank == 0:
            parser.error("needs two ranks to measure alpha and beta: mpiexec -n 2 mpifed bench model")
        return 2
    model = measure(comm)
    node_bw = node_copy_bandwidth(comm)
    measured, compute = measured_efficiency(args.scaling_csv)
    compute = args.compute_seconds or compute
    if compute is None:
        if comm.rank == 0:
            parser.error("give --scaling-csv with a 1-rank weak row, or --compute-seconds")
        return 2
    ranks_list = [2 ** k for k in range(11)]
    rows = predictions(model, compute, args.grad_bytes, args.ranks_per_node, node_bw, ranks_list)
    if comm.rank == 0:
        print(f"# alpha {model.alpha * 1e6:.2f} us, beta {1 / model.beta / 1e9:.2f} GB/s, "
              f"gamma {1 / model.gamma / 1e9:.2f} GB/s (reduce), node copy bandwidth "
              f"{node_bw / 1e9:.1f} GB/s; compute {compute * 1e3:.2f} ms/step; "
              f"{args.grad_bytes:,.0f} B per all-reduce; {args.ranks_per_node} ranks per node")
        print(f"# {'ranks':>5} {'nodes':>5} {'ring ms':>8} {'hier ms':>8} {'ring eff':>8} "
              f"{'hier eff':>8} {'measured':>8}")
        for row in rows:
            seen = measured.get(row["ranks"])
            print(f"  {row['ranks']:>5} {row['nodes']:>5} {row['ring_seconds'] * 1e3:>8.3f} "
                  f"{row['hierarchical_seconds'] * 1e3:>8.3f} {row['ring_efficiency']:>8.3f} "
                  f"{row['hierarchical_efficiency']:>8.3f} "
                  f"{'' if seen is None else f'{seen:.3f}':>8}")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"model": model.__dict__, "compute_seconds": compute,
                           "node_bandwidth": node_bw, "grad_bytes": args.grad_bytes,
                           "ranks_per_node": args.ranks_per_node, "predictions": rows,
                           "measured": measured}, fh, indent=1)
    return 0
