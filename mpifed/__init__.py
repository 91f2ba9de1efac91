"""mpifed: data-parallel SGD over a ring all-reduce, and federated learning across MPI rank groups."""

__version__ = "0.1.0"
