"""All-reduce size sweep in the style of nccl-tests: ring, mpi and auto side by side.

    mpiexec -n 4 mpifed bench allreduce --min-bytes 4 --max-bytes 64M --json out.json

Several nodes on one host (MPICH; MPI then sees 2 nodes, TCP over loopback between them):

    MPIR_CVAR_NUM_CLIQUES=2 MPIR_CVAR_CLIQUES_BY_BLOCK=1 MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp \
    FI_TCP_IFACE=lo mpiexec -n 4 mpifed bench allreduce --nodes 2 --arrays ordinary

Algorithms: ring, mpi (MPI_Allreduce), hierarchical (shared memory in a node), auto.
auto (--auto measured, the default): what training's "auto" does, the table measured at these
sizes on this communicator and buffer kind (mpifed/train/allreduce_choice.py; read from the
per-topology cache when it has them, MPIFED_AUTOTUNE=refresh measures again); --auto rule: the
fixed rule of comm/collectives.py. The auto/best column is auto's time over the fastest
algorithm's at each size; the last line gives the worst one from 64 KiB to 16 MiB against the
goal of 1.1x:

    mpiexec -n 4 mpifed bench allreduce -b 64K -e 16M -f 2 --auto measured --rounds 3

--rounds R sweeps every size R times in turn and reports each algorithm's median over the
rounds: on a shared machine a busy spell then spoils one round, not the comparison. The summary
also gives auto/best from each algorithm's fastest call (what is left when a busy machine's
waits are taken out) and splits auto/best into auto against the algorithm it ran, called by name
(its own per-call cost, plus noise), and that algorithm against the fastest (its choice).
Columns: size (bytes per rank), count (elements), type, then for each algorithm the median time
(us) over iterations (the slowest rank's time), algbw = size / time and busbw = algbw * 2(n-1)/n
(GB/s), #wrong (elements that differ from the exact expected sum). On one node it also measures
the memory bandwidth in the same run and prints the share of the memory bound each algorithm reaches.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from mpi4py import MPI

from ..comm import allreduce, choose_algorithm
from ..comm.autotune import bucket_bytes, call_orders, install, installed
from ..comm.shared import release, shared_array
from ..comm.topology import node_facts, topology, transport
from .membw import allreduce_bound_seconds, node_copy_bandwidth

ALGOS = ("ring", "mpi", "hierarchical", "auto")
SHORT = {"ring": "ring", "mpi": "mpi", "hierarchical": "hier", "auto": "auto"}


def parse_size(text: str) -> int:
    """Parse '4', '64K', '16M', '1G' into bytes."""
    text = text.strip().upper().rstrip("B")
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def sizes(lo: int, hi: int, factor: int) -> list[int]:
    """Return lo, lo*factor, ... up to hi (bytes)."""
    out, size = [], lo
    while size <= hi:
        out.append(size)
        size *= factor
    return out


def iterations_for(nbytes: int, requested: int | None) -> int:
    """Return how many timed iterations a size gets: more for small sizes, at least 5."""
    if requested:
        return requested
    return int(min(200, max(10, (256 << 20) // max(nbytes, 1) // 8)))


def time_size(comm, nbytes: int, dtype, iters: int, warmup: int, node=None,
              turn: int = 0) -> dict:
    """Time each algorithm at one size, interleaved in random orders so that noise hits all alike.

    node: given, the buffer is allocated in node shared memory (shared_array), as the training
    step allocates its gradients ("window arrays"); else it is an ordinary NumPy array. Every
    algorithm is called the same way on the same buffer. turn: the round (--rounds), which
    seeds the random orders with the size.
    """
    count = max(1, nbytes // np.dtype(dtype).itemsize)
    fill = dtype(comm.rank + 1)
    expected = dtype(comm.size * (comm.size + 1) // 2)
    buf = shared_array(count, dtype, node) if node is not None else np.empty(count, dtype=dtype)
    times = {a: [] for a in ALGOS}
    wrong = dict.fromkeys(ALGOS, 0)
    # a random order each iteration, the same on every rank, new ones each round (turn)
    orders = call_orders(len(ALGOS), warmup + iters, [nbytes, turn])
    for it, order in enumerate(orders):
        for algo in (ALGOS[i] for i in order):
            buf.fill(fill)
            comm.Barrier()
            start = time.perf_counter()
            allreduce(buf, comm, algorithm=algo, check=False)
            elapsed = time.perf_counter() - start
            if it >= warmup:
                times[algo].append(elapsed)
                wrong[algo] += int(np.count_nonzero(buf != expected))
    per_node = topology(comm)[0].size if comm.size > 1 else 1
    row = {"size": count * np.dtype(dtype).itemsize, "count": count,
           "type": np.dtype(dtype).name,
           "auto_picks": "mpi" if comm.size == 1 else choose_algorithm(
               buf.nbytes, comm.size, per_node, window=node is not None,
               nodes=comm.size // per_node, table=installed(comm))}
    factor = 2 * (comm.size - 1) / comm.size if comm.size > 1 else 1.0
    for algo in ALGOS:
        slowest = np.empty(len(times[algo]))
        comm.Allreduce(np.array(times[algo]), slowest, op=MPI.MAX)
        seconds = float(np.median(slowest))
        algbw = row["size"] / seconds / 1e9
        row[algo] = {"time_us": seconds * 1e6, "algbw": algbw, "busbw": algbw * factor,
                     "wrong": comm.allreduce(wrong[algo], op=MPI.SUM),
                     "best_us": float(slowest.min()) * 1e6}
    if node is not None:
        release(buf)
    return row


def auto_vs_best(row: dict, stat: str = "time_us") -> float:
    """Return auto's time over the fastest algorithm's at one size (1.0: auto was the best).
    stat: "time_us" (the median call) or "best_us" (the fastest call: what is left when a
    busy machine's waits are taken out)."""
    return row["auto"][stat] / min(row[a][stat] for a in ALGOS if a != "auto")


def merge_rounds(rows: list[dict], ranks: int) -> dict:
    """Return one size's row from its rows of several rounds: each algorithm's median time
    over the rounds (the bandwidths from it), the wrong elements of all rounds. Pure."""
    merged = dict(rows[0])
    factor = 2 * (ranks - 1) / ranks if ranks > 1 else 1.0
    for algo in ALGOS:
        seconds = float(np.median([r[algo]["time_us"] for r in rows])) / 1e6
        algbw = merged["size"] / seconds / 1e9
        merged[algo] = {"time_us": seconds * 1e6, "algbw": algbw, "busbw": algbw * factor,
                        "wrong": sum(r[algo]["wrong"] for r in rows),
                        "rounds_us": [r[algo]["time_us"] for r in rows],
                        "best_us": min(r[algo]["best_us"] for r in rows)}
    return merged


def print_header(comm, node_bw, facts: dict, arrays: str) -> None:
    print(f"# mpifed all-reduce benchmark: {comm.size} ranks, "
          f"{MPI.Get_library_version().splitlines()[0].strip()}")
    print(f"# --nodes {facts['nodes']}: {facts['nodes']} x {facts['ranks_per_node']} ranks "
          f"({' + '.join(map(str, facts['node_sizes']))}); between nodes: {transport(facts)}; "
          f"{arrays} arrays")
    if node_bw:
        print(f"# node memory bandwidth (copy, all ranks at once): {node_bw / 1e9:.1f} GB/s; "
              "bound = 2 * ranks * size / bandwidth")
    cols = "".join(f" | {SHORT[a]:>9} {'algbw':>6} {'busbw':>6} {'#wrong':>6}" for a in ALGOS)
    bound = (" | bound_us " + " ".join(f"{SHORT[a]}%" for a in ALGOS)) if node_bw else ""
    print(f"# {'size':>10} {'count':>9} {'type':>7}{cols} | auto/best{bound}")
    print("# (time in us, bandwidth in GB/s)")


def format_row(row: dict) -> str:
    cols = "".join(f" | {row[a]['time_us']:9.1f} {row[a]['algbw']:6.2f} {row[a]['busbw']:6.2f} "
                   f"{row[a]['wrong']:6d}" for a in ALGOS)
    line = f"  {row['size']:>10} {row['count']:>9} {row['type']:>7}{cols} | {row['auto_vs_best']:8.2f}x"
    if "bound_us" in row:
        shares = " ".join(f"{100 * row['bound_us'] / row[a]['time_us']:{len(SHORT[a]) + 1}.0f}"
                          for a in ALGOS)
        line += f" | {row['bound_us']:8.1f} {shares}"
    return line


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="mpifed bench allreduce", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-b", "--min-bytes", default="4", help="smallest size (default 4)")
    parser.add_argument("-e", "--max-bytes", default="64M", help="largest size (default 64M)")
    parser.add_argument("-f", "--factor", type=int, default=4, help="size step factor (default 4)")
    parser.add_argument("-n", "--iters", type=int, default=None,
                        help="timed iterations per size (default: by size, 10 to 200)")
    parser.add_argument("-w", "--warmup", type=int, default=2, help="warm-up iterations")
    parser.add_argument("-r", "--rounds", type=int, default=1,
                        help="sweep every size this many times in turn; each algorithm's time "
                             "is then its median over the rounds (a busy spell on a shared "
                             "machine spoils one round, not the figure)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "int32",
                                                                "int64"])
    parser.add_argument("--json", metavar="PATH", help="write the rows as JSON for plotting")
    parser.add_argument("--nodes", type=int, default=None,
                        help="the nodes this run must see (checked against MPI's count: on one "
                             "host, set MPIR_CVAR_NUM_CLIQUES as above)")
    parser.add_argument("--auto", choices=["measured", "rule"], default="measured",
                        help="what the auto column runs: the table measured at these sizes, "
                             "as training's auto (default), or the fixed rule")
    parser.add_argument("--arrays", choices=["window", "ordinary"], default=None,
                        help="window: buffers from shared_array, as training allocates "
                             "gradients; ordinary: NumPy arrays, as library users pass "
                             "(default: window on one node, ordinary across nodes)")
    args = parser.parse_args(argv)
    comm = MPI.COMM_WORLD
    lo, hi = parse_size(args.min_bytes), parse_size(args.max_bytes)
    if lo < 1 or hi < lo or args.factor < 2 or args.rounds < 1:
        if comm.rank == 0:
            parser.error(f"need 1 <= --min-bytes <= --max-bytes, --factor >= 2 and --rounds "
                         f">= 1 (got {lo}, {hi}, {args.factor}, {args.rounds})")
        return 2
    facts = node_facts(comm)
    if args.nodes is not None and args.nodes != facts["nodes"]:
        if comm.rank == 0:
            parser.error(f"--nodes {args.nodes}: MPI sees {facts['nodes']} node(s); on one host "
                         f"set MPIR_CVAR_NUM_CLIQUES={args.nodes} MPIR_CVAR_CH4_NETMOD=ofi "
                         "FI_PROVIDER=tcp FI_TCP_IFACE=lo (or MPIFED_RANKS_PER_NODE)")
        return 2
    one_node = facts["nodes"] == 1
    arrays = args.arrays or ("window" if one_node else "ordinary")
    node = topology(comm)[0] if comm.size > 1 else None
    node_bw = node_copy_bandwidth(node if node is not None else comm) if one_node else None
    dtype = np.dtype(args.dtype).type
    table = tune_auto(comm, args.auto, sizes(lo, hi, args.factor), args.dtype,
                      arrays == "window")
    if comm.rank == 0:
        print_header(comm, node_bw, facts, arrays)
        print(f"# auto: {args.auto}" + (f" ({table_text(table)})" if table else ""))
    rows, rounds = [], []
    for turn in range(args.rounds):
        this_round = [time_size(comm, nbytes, dtype, iterations_for(nbytes, args.iters),
                                args.warmup, node if arrays == "window" else None, turn)
                      for nbytes in sizes(lo, hi, args.factor)]
        rounds.append(this_round)
        goal = [auto_vs_best(r) for r in this_round if 64 << 10 <= r["size"] <= 16 << 20]
        if comm.rank == 0 and args.rounds > 1 and goal:
            print(f"# round {turn + 1} of {args.rounds}: worst auto/best 64 KiB-16 MiB "
                  f"{max(goal):.2f}x", flush=True)
    for per_round in zip(*rounds):
        row = merge_rounds(list(per_round), comm.size)
        row["auto_vs_best"] = auto_vs_best(row)
        if node_bw:
            row["bound_us"] = allreduce_bound_seconds(row["size"], comm.size, node_bw) * 1e6
        rows.append(row)
        if comm.rank == 0:
            print(format_row(row), flush=True)
    if comm.rank == 0:
        big = [r for r in rows if r["size"] >= 4 << 20]
        for algo in ALGOS:
            avg = np.mean([r[algo]["busbw"] for r in rows])
            print(f"# {algo}: avg busbw {avg:.2f} GB/s", end="")
            if big and algo in ("ring", "hierarchical"):
                ratio = max(r[algo]["time_us"] / r["mpi"]["time_us"] for r in big)
                print(f"; worst {algo}/mpi time at >= 4 MiB: {ratio:.2f}", end="")
            print()
        mid = [r for r in rows if 64 << 10 <= r["size"] <= 64 << 20]
        if mid:
            gain = min(r["hierarchical"]["busbw"] / r["mpi"]["busbw"] for r in mid)
            slower = max(r["hierarchical"]["time_us"] / r["ring"]["time_us"] for r in mid)
            print(f"# 64 KiB-64 MiB: hierarchical busbw >= {gain:.2f}x mpi's; "
                  f"hierarchical time <= {slower:.2f}x the ring's")
        print(f"# worst auto/best over all sizes: {max(r['auto_vs_best'] for r in rows):.2f}x")
        goal = [r["auto_vs_best"] for r in rows if 64 << 10 <= r["size"] <= 16 << 20]
        if goal:
            print(f"# auto ({args.auto}) vs the fastest, 64 KiB-16 MiB: worst {max(goal):.2f}x "
                  f"(goal <= 1.10x: {'met' if max(goal) <= 1.1 else 'not met'})")
            mid = [r for r in rows if 64 << 10 <= r["size"] <= 16 << 20]
            own = max(r["auto"]["time_us"] / r[r["auto_picks"]]["time_us"] for r in mid)
            pick = max(r[r["auto_picks"]]["time_us"] / min(r[a]["time_us"] for a in ALGOS
                                                           if a != "auto") for r in mid)
            fastest = max(auto_vs_best(r, "best_us") for r in mid)
            print(f"# by each algorithm's fastest call instead of its median (the waits of a "
                  f"busy machine taken out): worst auto/best {fastest:.2f}x")
            print(f"# split: auto vs the algorithm it ran, called by name (its own cost and "
                  f"the noise): worst {own:.2f}x; that algorithm vs the fastest (the choice): "
                  f"worst {pick:.2f}x")
        if args.json:
            meta = {"ranks": comm.size, "nodes": facts["nodes"], "auto": args.auto,
                    "rounds": args.rounds,
                    "auto_table": {str(b): a for b, a in (table or {}).items()},
                    "ranks_per_node": facts["ranks_per_node"], "arrays": arrays,
                    "transport": transport(facts), "node_bandwidth": node_bw,
                    "mpi": MPI.Get_library_version().splitlines()[0].strip()}
            with open(args.json, "w") as fh:
                json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    install(comm, None)
    return 0


def tune_auto(comm, mode: str, nbytes: list[int], dtype: str, window: bool) -> dict | None:
    """Install on `comm` the table "auto" follows for these sizes (mode "measured"), as a
    training run does; return it (None: the fixed rule). Collective."""
    if mode != "measured" or comm.size == 1:
        return None
    from ..train.allreduce_choice import tuned_table

    itemsize = np.dtype(dtype).itemsize
    buckets = [bucket_bytes(max(1, n // itemsize) * itemsize) for n in nbytes]
    table, _ = tuned_table(comm, buckets, dtype, window)
    install(comm, table)
    return table


def table_text(table: dict) -> str:
    """Return '64K:mpi 1M:ring' for {65536: 'mpi', 1048576: 'ring'}."""
    def short(n: int) -> str:
        for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if n >= scale and n % scale == 0:
                return f"{n // scale}{unit}"
        return str(n)
    return " ".join(f"{short(b)}:{a}" for b, a in sorted(table.items()))
