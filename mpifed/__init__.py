"""mpifed: data-parallel SGD over a ring all-reduce, and federated learning across MPI rank groups."""

__version__ = "0.1.0"


def abort_on_exception() -> None:
    """Abort all ranks when any rank raises an uncaught exception (ChainerMN's habit).

    >>> import mpifed; mpifed.abort_on_exception()   # at the top of an MPI script
    """
    from .cli.failures import install_abort_hook

    install_abort_hook()
