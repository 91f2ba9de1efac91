"""Moving bytes between ranks: array backends, the ring all-reduce, MPI's own, fusion."""

from ..nn.layout import Layout, fuse, unfuse, views
from ..xp import backend_module, get_array_module, synchronize
from .backend import cuda_aware, select_device
from .collectives import ALGORITHMS, allreduce, choose_algorithm
from .hierarchical import hierarchical_allreduce
from .native import mpi_allreduce
from .ring import chunk_bounds, ring_allreduce
from .shared import shared_array

__all__ = [
    "ALGORITHMS", "Layout", "allreduce", "backend_module", "choose_algorithm", "chunk_bounds",
    "cuda_aware", "fuse", "get_array_module", "hierarchical_allreduce", "mpi_allreduce",
    "ring_allreduce", "select_device", "shared_array", "synchronize", "unfuse", "views",
]
