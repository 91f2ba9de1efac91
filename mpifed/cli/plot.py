"""`mpifed plot`: PNG plots of scaling and all-reduce results (matplotlib, an optional extra)."""

from __future__ import annotations

import json
import os

from ..errors import UserError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")  # no screen on a cluster node
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("mpifed plot needs matplotlib: pip install 'mpifed[plot]'") from None
    return plt


def _load(path: str) -> dict:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{path!r}: cannot read it as JSON ({err})") from None


def plot_scaling(scaling: dict, out: str) -> list[str]:
    """Write speedup.png and efficiency.png (measured, ideal, predicted); return the paths."""
    plt = _pyplot()
    rows = scaling.get("rows", [])
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("strong", "weak"):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        base = float(next(r for r in mine if r["ranks"] == "1")["samples_per_s"])
        ranks = [int(r["ranks"]) for r in mine]
        ax.plot(ranks, [float(r["samples_per_s"]) / base for r in mine], "o-",
                label=f"{mode} scaling, measured")
    if rows:
        top = max(int(r["ranks"]) for r in rows)
        ax.plot([1, top], [1, top], "k--", label="ideal")
    ax.set(xlabel="ranks", ylabel="speed-up (samples/s over 1 rank)", xscale="log",
           yscale="log", title="Training throughput speed-up")
    ax.legend()
    written.append(_save(fig, out, "speedup.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("strong", "weak"):
        mine = [r for r in rows if r["mode"] == mode and r["efficiency"]]
        ax.plot([int(r["ranks"]) for r in mine], [float(r["efficiency"]) for r in mine], "o-",
                label=f"{mode}, measured")
    model = scaling.get("model", {}).get("predictions", [])
    if model:
        ax.plot([p["ranks"] for p in model], [p["ring_efficiency"] for p in model], ":",
                label="weak, predicted (ring)")
        ax.plot([p["ranks"] for p in model], [p["hierarchical_efficiency"] for p in model], "-.",
                label="weak, predicted (hierarchical)")
    ax.axhline(1.0, color="k", linestyle="--", label="ideal")
    ax.set(xlabel="ranks", ylabel="efficiency", xscale="log", ylim=(0, 1.1),
           title="Scaling efficiency")
    ax.legend(fontsize=8)
    written.append(_save(fig, out, "efficiency.png"))
    return written


def plot_allreduce(result: dict, out: str) -> str:
    """Write busbw.png: bus bandwidth of each algorithm against message size."""
    plt = _pyplot()
    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for algo in ("ring", "mpi", "hierarchical", "auto"):
        if algo in rows[0]:
            ax.plot([r["size"] for r in rows], [r[algo]["busbw"] for r in rows], "o-",
                    markersize=3, label=algo)
    if result["meta"].get("node_bandwidth"):
        ranks = result["meta"]["ranks"]
        bound = [r["size"] / r["bound_us"] * 1e6 / 1e9 * 2 * (ranks - 1) / ranks
                 for r in rows if r.get("bound_us")]
        ax.plot([r["size"] for r in rows if r.get("bound_us")], bound, "k--",
                label="memory bound")
    ax.set(xlabel="bytes per rank", ylabel="bus bandwidth (GB/s)", xscale="log",
           title=f"All-reduce, {result['meta']['ranks']} ranks")
    ax.legend()
    return _save(fig, out, f"busbw-{result['meta']['ranks']}.png")


def _save(fig, out: str, name: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def run_plot(args) -> int:
    written = []
    if args.scaling:
        written += plot_scaling(_load(args.scaling), args.out)
    for path in args.allreduce or []:
        written.append(plot_allreduce(_load(path), args.out))
    if not written:
        raise UserError("nothing to plot: give a scaling JSON and/or --allreduce JSON files")
    print("wrote " + ", ".join(written))
    return 0
