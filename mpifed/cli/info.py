"""`mpifed info`: what MPI, how many ranks and nodes, and whether a GPU path is available."""

from __future__ import annotations

import os
import platform

from .output import emit


def info_lines(comm) -> list[str]:
    """Return the lines `mpifed info` prints (collective over `comm`)."""
    import mpi4py
    import numpy as np
    from mpi4py import MPI

    from ..comm.backend import cupy_module, select_device
    from ..comm.topology import node_facts, transport

    facts = node_facts(comm)
    cp = cupy_module()
    if cp is not None:
        select_device(comm)  # as training does: warns when ranks share a GPU
    version = MPI.Get_library_version().strip().splitlines()[0]
    gpus = cp.cuda.runtime.getDeviceCount() if cp is not None else 0
    std = "{}.{}".format(*MPI.Get_version())
    return [
        f"MPI library      : {version}",
        f"MPI standard     : {std}",
        f"mpi4py           : {mpi4py.__version__}",
        f"ranks            : {comm.size}",
        f"nodes            : {facts['nodes']}",
        f"ranks per node   : {facts['ranks_per_node']} "
        f"({' + '.join(str(s) for s in facts['node_sizes'])})",
        f"between nodes    : {transport(facts)}",
        f"numpy            : {np.__version__}",
        f"cupy             : {cp.__version__ if cp is not None else 'not installed or no GPU'}",
        f"GPUs on node 0   : {gpus}",
        f"CUDA-aware MPI   : {cuda_aware_line()}",
        f"NCCL             : {nccl_line(comm) if cp is not None else 'no GPU'}",
        *thread_lines(comm),
        f"python           : {platform.python_version()} on {platform.node()}",
    ]


def thread_lines(comm) -> list[str]:
    """Return the BLAS thread count of every rank and why, ranks that agree on one line
    (collective; the text travels as bytes, never pickled)."""
    from ..comm.agree import gather_texts
    from ..errors import UserError
    from ..train.setup import thread_choice

    try:
        choice = thread_choice(comm)
        own = f"{choice.threads} ({choice.reason})"
    except UserError as err:
        own = f"unusable: {err}"
    ranks_by_text: dict[str, list[int]] = {}
    for rank, text in enumerate(gather_texts(comm, own)):
        ranks_by_text.setdefault(text, []).append(rank)
    return [f"BLAS threads     : {text} on {rank_list(ranks)}"
            for text, ranks in ranks_by_text.items()]


def rank_list(ranks: list[int]) -> str:
    """Return `ranks` (sorted) as "rank 0", "ranks 0-3" or "ranks 0-1, 5"."""
    runs, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur != prev + 1:
            runs.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ("rank " if len(ranks) == 1 else "ranks ") + ", ".join(runs)


def cuda_aware_line() -> str:
    """Say whether device buffers go to MPI directly, and who decided."""
    from ..comm.backend import cuda_aware

    forced = os.environ.get("MPIFED_CUDA_AWARE")
    if forced is not None:
        return (f"{'yes' if cuda_aware() else 'no'} (forced by MPIFED_CUDA_AWARE={forced}: "
                "the override is for MPIs whose query answers wrongly; a forced yes is checked "
                "at start-up with a one-element device all-reduce)")
    return "yes" if cuda_aware() else "no (device buffers staged via host)"


def nccl_line(comm) -> str:
    """Say whether comm.allreduce = "nccl" can run on `comm`, and why not (collective)."""
    from ..comm.nccl import nccl_library, nccl_unavailable

    reason = nccl_unavailable(comm)
    if reason:
        return f"unusable: {reason}"
    return f"yes (version {nccl_library().get_version()})"


def run_info(args) -> int:
    from mpi4py import MPI

    lines = info_lines(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:
        emit("\n".join(lines))
    return 0
