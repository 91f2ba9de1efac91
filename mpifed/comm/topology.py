"""Which ranks share a node: the node communicator, node-local ranks and the node count.

Everything in mpifed that asks "how many ranks share this node" asks `topology(comm)`, which
splits once per communicator and caches the result on it (an MPI attribute, so it goes when the
communicator does).
"""

from __future__ import annotations

import os

from mpi4py import MPI

from . import lifetime
from .scalars import allgather_ints, allreduce_int

# (node, cross) cached on the communicator; its delete callback frees both with it, and
# lifetime frees them before MPI_Finalize when the communicator lives that long.
_TOPOLOGY = lifetime.keyval()


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


def topology(comm):
    """Return (node, cross) for `comm`, split once and cached: cross joins equal node ranks.

    cross is None when nodes hold different rank counts (slices would not line up).
    Collective over `comm` the first time.
    """
    cached = comm.Get_attr(_TOPOLOGY)
    if cached is None:
        node = node_comm(comm)
        smallest = allreduce_int(comm, node.size, MPI.MIN)  # buffers: comm may span
        largest = allreduce_int(comm, node.size, MPI.MAX)  # institutions
        cross = comm.Split(node.rank, comm.rank) if smallest == largest else None
        cached = (node, cross)
        lifetime.cache(comm, _TOPOLOGY, cached)
    return cached


def ranks_per_node(comm) -> int:
    """Return how many ranks of `comm` share this rank's node (collective the first time)."""
    return topology(comm)[0].size


def node_rank(comm) -> int:
    """Return this rank's place among the ranks of `comm` on its node (collective the first time)."""
    return topology(comm)[0].rank


def node_facts(comm) -> dict:
    """Return node facts for `comm` (collective): node_rank, ranks_per_node (max), nodes,
    node_sizes (ranks on each node, by the node's lowest rank) and mpi_nodes (the nodes MPI
    itself sees, which differ from `nodes` only under MPIFED_RANKS_PER_NODE)."""
    node = topology(comm)[0]
    nodes = allreduce_int(comm, 1 if node.rank == 0 else 0, MPI.SUM)
    ranks_per_node = allreduce_int(comm, node.size, MPI.MAX)
    sizes = [s for s in allgather_ints(comm, node.size if node.rank == 0 else 0) if s]
    return {"node_rank": node.rank, "ranks_per_node": ranks_per_node, "nodes": nodes,
            "node_sizes": sizes, "mpi_nodes": mpi_nodes(comm)}


def mpi_nodes(comm) -> int:
    """Return how many nodes MPI itself reports for `comm` (MPI_COMM_TYPE_SHARED; collective)."""
    shared = comm.Split_type(MPI.COMM_TYPE_SHARED, comm.rank)
    try:
        return allreduce_int(comm, 1 if shared.rank == 0 else 0, MPI.SUM)
    finally:
        shared.Free()


def transport(facts: dict) -> str:
    """Say how bytes move between nodes: the netmod and provider MPI was told to use.

    MPICH's own choice is not queryable through mpi4py; the environment that steers it
    (MPIR_CVAR_CH4_NETMOD, FI_PROVIDER, FI_TCP_IFACE, MPIR_CVAR_NUM_CLIQUES) is what decides it,
    and MPIR_CVAR_DEBUG_SUMMARY=1 prints the provider and address to confirm.
    """
    env = os.environ
    if facts["mpi_nodes"] == 1:
        if facts["nodes"] > 1:
            return ("shared memory (nodes emulated by MPIFED_RANKS_PER_NODE="
                    f"{env.get('MPIFED_RANKS_PER_NODE')}; MPI sees one node)")
        return "none (one node: shared memory)"
    netmod = env.get("MPIR_CVAR_CH4_NETMOD", "the MPI library's default")
    provider = env.get("FI_PROVIDER")
    iface = env.get("FI_TCP_IFACE")
    text = f"netmod {netmod}"
    if provider:
        text += f", libfabric provider {provider}"
    if iface:
        text += f" on interface {iface}" + (" (loopback, 127.0.0.1)" if iface == "lo" else "")
    cliques = env.get("MPIR_CVAR_NUM_CLIQUES")
    if cliques:
        text += f"; nodes emulated on one host by MPIR_CVAR_NUM_CLIQUES={cliques}"
    return text
