"""Federated learning across MPI rank groups: layouts, strategies, rounds."""
