"""mpifed: data-parallel SGD over a ring all-reduce, and federated learning across MPI rank groups.

    import mpifed
    summary = mpifed.train.run("run.toml")          # under mpiexec: every rank calls it
    cfg = mpifed.config.load_config("run.toml")     # the typed configuration

The sub-packages `train`, `config`, `nn` and `data` are imported when first used (PEP 562), so
`import mpifed` alone starts no MPI (mpi4py is imported by the first call that needs it).
"""

import importlib

__version__ = "0.1.0"

_LAZY = ("config", "data", "nn", "train")

__all__ = ["__version__", "abort_on_exception", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mpifed' has no attribute {name!r}")
    return importlib.import_module(f".{name}", __name__)


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


def abort_on_exception() -> None:
    """Abort all ranks when any rank raises an uncaught exception (ChainerMN's habit).

    >>> import mpifed; mpifed.abort_on_exception()   # at the top of an MPI script
    """
    from .cli.failures import install_abort_hook

    install_abort_hook()
