"""`mpifed plot`: PNG plots of scaling and all-reduce results (matplotlib, an optional extra)."""

from __future__ import annotations

import json
import os

from ..errors import UserError
from .output import emit


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


def _rank_axis(ax, ranks) -> None:
    """Log2 rank axis with plain ticks (1, 2, 4, 8, ...), not 2 x 10^0."""
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    top = max(ranks) if ranks else 1
    ticks = [2 ** k for k in range(0, max(1, int(top).bit_length()))]
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_locator(NullLocator())


def _series(rows, mode: str, multi: bool) -> list[dict]:
    """Rows of one mode, on one node (multi False) or on several nodes (multi True)."""
    return [r for r in rows if r["mode"] == mode and (int(r.get("nodes") or 1) > 1) == multi]


def plot_scaling(scaling: dict, out: str) -> list[str]:
    """Write speedup.png, efficiency.png (and heldout.png with a held-out model check).

    Measured points are markers; the model's predictions are lines (one node) or hollow markers
    (a multi-node configuration); the configuration and the link are in the legend.
    """
    plt = _pyplot()
    rows = scaling.get("rows", [])
    ranks_all = [int(r["ranks"]) for r in rows] or [1]
    written = []
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, marker in (("strong", "s"), ("weak", "o")):
        mine = _series(rows, mode, False)
        if not mine:
            continue
        base = float(next(r for r in mine if r["ranks"] == "1")["samples_per_s"])
        ax.plot([int(r["ranks"]) for r in mine], [float(r["samples_per_s"]) / base for r in mine],
                marker=marker, linestyle="-", linewidth=0.8,
                label=f"{mode}, measured, 1 node (shared memory)")
        for r in _series(rows, mode, True):
            ax.plot(int(r["ranks"]), float(r["samples_per_s"]) / base, marker="D", color="C3",
                    linestyle="none", label=f"{mode}, measured, {r['nodes']} nodes x "
                    f"{int(r['ranks']) // int(r['nodes'])} (TCP over loopback)")
    ax.plot([1, max(ranks_all)], [1, max(ranks_all)], "k--", linewidth=0.8, label="ideal")
    _rank_axis(ax, ranks_all)
    ax.set(xlabel="ranks", ylabel="speed-up (samples/s over 1 rank)",
           title="Training throughput speed-up, benchmark MLP")
    legend_below(ax)
    written.append(_save(fig, out, "speedup.png"))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for mode, marker in (("strong", "s"), ("weak", "o")):
        mine = [r for r in _series(rows, mode, False) if r["efficiency"]]
        ax.plot([int(r["ranks"]) for r in mine], [float(r["efficiency"]) for r in mine],
                marker=marker, linestyle="none", label=f"{mode}, measured, 1 node")
        for r in _series(rows, mode, True):
            if r["efficiency"]:
                ax.plot(int(r["ranks"]), float(r["efficiency"]), marker="D", color="C3",
                        linestyle="none", label=f"{mode}, measured, {r['nodes']} nodes x "
                        f"{int(r['ranks']) // int(r['nodes'])} (TCP)")
    model = [p for p in scaling.get("model", {}).get("predictions", [])
             if p["ranks"] <= max(8, max(ranks_all))]
    if model:
        ax.plot([p["ranks"] for p in model], [p["ring_efficiency"] for p in model], ":",
                label="weak, model (ring, shared memory)")
        ax.plot([p["ranks"] for p in model], [p["hierarchical_efficiency"] for p in model], "-.",
                label="weak, model (hierarchical, 2 ranks/node)")
    for p in scaling.get("multinode_predictions", []):
        if p.get("efficiency") is not None:
            ax.plot(p["ranks"], p["efficiency"], marker="D", markerfacecolor="none",
                    color="C3", linestyle="none", label=f"weak, two-level model, {p['nodes']} "
                    f"nodes x {p['ranks_per_node']} (hierarchical)")
    ax.axhline(1.0, color="k", linestyle="--", linewidth=0.8, label="ideal")
    _rank_axis(ax, ranks_all + [p["ranks"] for p in model])
    ax.set(xlabel="ranks", ylabel="efficiency", ylim=(0, 1.1),
           title="Scaling efficiency: measured (markers) vs model (lines)")
    legend_below(ax)
    written.append(_save(fig, out, "efficiency.png"))
    if scaling.get("heldout"):
        written.append(plot_heldout(scaling["heldout"], out))
    return written


def plot_heldout(heldout: dict, out: str) -> str:
    """Write heldout.png: predicted (lines) against measured (markers) time per size."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    rows = heldout["rows"]
    keys = sorted({(r["config"], r["algorithm"]) for r in rows})
    for i, (config, algo) in enumerate(keys):
        mine = [r for r in rows if r["config"] == config and r["algorithm"] == algo]
        sizes = [r["size"] for r in mine]
        ax.plot(sizes, [r["measured_s"] * 1e6 for r in mine], marker="o", linestyle="none",
                color=f"C{i}", label=f"{config} {algo}, measured")
        ax.plot(sizes, [r["predicted_s"] * 1e6 for r in mine], linestyle="-", color=f"C{i}",
                label=f"{config} {algo}, model")
    ax.set(xlabel="bytes per rank", ylabel="time (us)", xscale="log", yscale="log",
           title="All-reduce, nodes x ranks held out of the fit\n(TCP over loopback)")
    legend_below(ax)
    return _save(fig, out, "heldout.png")


def plot_allreduce(result: dict, out: str) -> str:
    """Write busbw-RANKS[-NODESxL].png: bus bandwidth of each algorithm against message size."""
    plt = _pyplot()
    rows = result["rows"]
    meta = result["meta"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for algo in ("ring", "mpi", "hierarchical", "auto"):
        if algo in rows[0]:
            ax.plot([r["size"] for r in rows], [r[algo]["busbw"] for r in rows], "o-",
                    markersize=3, label=algo)
    if meta.get("node_bandwidth"):
        ranks = meta["ranks"]
        bound = [r["size"] / r["bound_us"] * 1e6 / 1e9 * 2 * (ranks - 1) / ranks
                 for r in rows if r.get("bound_us")]
        ax.plot([r["size"] for r in rows if r.get("bound_us")], bound, "k--",
                label="memory bound")
    nodes = int(meta.get("nodes", 1))
    per_node = int(meta.get("ranks_per_node", meta["ranks"] // max(nodes, 1)))
    link = "TCP over loopback between nodes" if nodes > 1 else "shared memory"
    arrays = f", {meta['arrays']} arrays" if meta.get("arrays") else ""
    ax.set(xlabel="bytes per rank", ylabel="bus bandwidth (GB/s)", xscale="log",
           title=f"All-reduce, {nodes} node(s) x {per_node} ranks\n{link}{arrays}")
    legend_below(ax)
    name = f"busbw-{meta['ranks']}.png" if nodes == 1 else \
        f"busbw-{nodes}x{per_node}{'-' + meta['arrays'] if meta.get('arrays') else ''}.png"
    return _save(fig, out, name)


def legend_below(ax) -> None:
    """Place the legend under the axes, outside them, so that it never covers data."""
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=7,
              frameon=False)


def _save(fig, out: str, name: str) -> str:
    """Save `fig` as OUT/NAME; the bounding box grows to hold the title and the legend."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def run_plot(args) -> int:
    written = []
    if args.run:
        from .run_plot import plot_run

        written += plot_run(args.run, args.out)
    args.out = args.out or "."
    if args.scaling:
        data = _load(args.scaling)
        if "intra" in data and "inter" in data:  # a held-out table: mpifed bench model --fit
            written.append(plot_heldout(data, args.out))
        else:
            written += plot_scaling(data, args.out)
    for path in args.allreduce or []:
        written.append(plot_allreduce(_load(path), args.out))
    if not written:
        raise UserError("nothing to plot: give --run RUN_DIR, a scaling JSON and/or --allreduce "
                        "JSON files")
    emit("wrote " + ", ".join(written))
    return 0
