"""`mpifed info`: what MPI, how many ranks and nodes, and whether a GPU path is available."""

from __future__ import annotations

import platform


def info_lines(comm) -> list[str]:
    """Return the lines `mpifed info` prints (collective over `comm`)."""
    import mpi4py
    import numpy as np
    from mpi4py import MPI

    from ..comm.backend import cuda_aware, cupy_module
    from ..comm.topology import node_facts

    facts = node_facts(comm)
    cp = cupy_module()
    version = MPI.Get_library_version().strip().splitlines()[0]
    gpus = cp.cuda.runtime.getDeviceCount() if cp is not None else 0
    std = "{}.{}".format(*MPI.Get_version())
    return [
        f"MPI library      : {version}",
        f"MPI standard     : {std}",
        f"mpi4py           : {mpi4py.__version__}",
        f"ranks            : {comm.size}",
        f"nodes            : {facts['nodes']}",
        f"ranks per node   : {facts['ranks_per_node']}",
        f"numpy            : {np.__version__}",
        f"cupy             : {cp.__version__ if cp is not None else 'not installed or no GPU'}",
        f"GPUs on node 0   : {gpus}",
        f"CUDA-aware MPI   : {'yes' if cuda_aware() else 'no (device buffers staged via host)'}",
        f"python           : {platform.python_version()} on {platform.node()}",
    ]


def run_info(args) -> int:
    from mpi4py import MPI

    lines = info_lines(MPI.COMM_WORLD)
    if MPI.COMM_WORLD.rank == 0:
        print("\n".join(lines))
    return 0
