"""Which ranks share a node: the node communicator and node-local ranks."""

from __future__ import annotations

import os

from mpi4py import MPI


def node_comm(comm):
    """Return a new communicator of the ranks of `comm` that share this node (caller frees it).

    `MPIFED_RANKS_PER_NODE=k` pretends that each block of k consecutive ranks is a node, so that
    several nodes can be emulated on one machine in tests.
    """
    forced = os.environ.get("MPIFED_RANKS_PER_NODE")
    if forced:
        per_node = int(forced)
        if per_node < 1:
            raise ValueError(f"MPIFED_RANKS_PER_NODE={forced!r}: must be a positive integer")
        return comm.Split(comm.rank // per_node, comm.rank)
    return comm.Split_type(MPI.COMM_TYPE_SHARED, comm.rank)


def layout(comm) -> dict:
    """Return node facts for `comm`: node_rank, ranks_per_node (max), nodes."""
    local = node_comm(comm)
    node_rank, local_size = local.rank, local.size
    local.Free()
    is_leader = 1 if node_rank == 0 else 0
    nodes = comm.allreduce(is_leader, op=MPI.SUM)
    ranks_per_node = comm.allreduce(local_size, op=MPI.MAX)
    return {"node_rank": node_rank, "ranks_per_node": ranks_per_node, "nodes": nodes}
