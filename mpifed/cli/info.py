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
        f"python           : {platform.python_version()} on {platform.node()}",
    ]


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
