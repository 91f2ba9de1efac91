"""Benchmarks: one module each, run by `mpifed bench NAME` and by the thin scripts in bench/.

The benchmark model (MLP 784-512-256-10) is defined once, in `mlp.py`; the PyTorch peer's copy of
it is in `peers.py`; the mpiexec they launch comes from `mpifed.launch.mpiexec_path`.
"""
