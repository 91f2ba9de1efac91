"""Moving bytes between ranks: array backends, the ring all-reduce and its two halves
(reduce-scatter, all-gather), MPI's own, the hierarchical scheme, fusion."""

from ..nn.layout import Layout, fuse, unfuse, views
from ..xp import backend_module, get_array_module, synchronize
from .backend import cuda_aware, select_device
from .collectives import (
    ALGORITHMS,
    SHARD_ALGORITHMS,
    allgather,
    allreduce,
    choose_algorithm,
    reduce_scatter,
)
from .hierarchical import (
    hierarchical_allgather,
    hierarchical_allreduce,
    hierarchical_reduce_scatter,
)
from .native import mpi_allgather, mpi_allreduce, mpi_reduce_scatter
from .ring import chunk_bounds, ring_allgather, ring_allreduce, ring_reduce_scatter
from .shared import shared_array

__all__ = [
    "ALGORITHMS", "SHARD_ALGORITHMS", "Layout", "allgather", "allreduce", "backend_module",
    "choose_algorithm", "chunk_bounds", "cuda_aware", "fuse", "get_array_module",
    "hierarchical_allgather", "hierarchical_allreduce", "hierarchical_reduce_scatter",
    "mpi_allgather", "mpi_allreduce", "mpi_reduce_scatter", "reduce_scatter", "ring_allgather",
    "ring_allreduce", "ring_reduce_scatter", "select_device", "shared_array", "synchronize",
    "unfuse", "views",
]
