"""How a run ends when something goes wrong: one message, a non-zero exit, and never a hang.

User errors (UserError) print one line without a traceback (`mpifed: error: ...`, a format of
its own, not mpifed.log's); `--debug` shows it. An unforeseen exception on one rank calls
MPI_Abort, so the ranks waiting for it in a collective end too (ChainerMN's abort-on-exception
hook).
"""

from __future__ import annotations

import sys
import time
import traceback

from ..errors import UserError
from ..log import world_rank_and_size

EXIT_USER_ERROR = 1
EXIT_INTERNAL_ERROR = 3


def report(message: str, rank: int, size: int) -> None:
    """Print one error line to stderr, prefixed with the rank when there are several.

    The one stderr line written outside mpifed.log, in a format of its own that scripts and
    tests grep (`mpifed: error [rank N]: ...`): kept as it was when logging came.
    """
    if message.startswith("[rank "):  # it already names the rank that saw it
        prefix = "mpifed: error "
    else:
        prefix = f"mpifed: error [rank {rank}]: " if size > 1 else "mpifed: error: "
    print(prefix + message, file=sys.stderr, flush=True)


def run_guarded(fn, debug: bool = False) -> int:
    """Call fn(); turn exceptions into one message and an exit code, aborting MPI if needed.

    A UserError is raised by every rank together (it came out of a collective check) or by the
    rank that saw it: the former prints on rank 0 only; the latter is marked `collective=False`
    and aborts, so the other ranks do not wait forever.
    """
    try:
        return fn() or 0
    except KeyboardInterrupt:
        rank, size = world_rank_and_size()
        report("interrupted", rank, size)
        _abort_if_parallel(130)
        return 130
    except UserError as err:
        rank, size = world_rank_and_size()
        collective = getattr(err, "collective", True)
        if debug:
            traceback.print_exc()
        if (rank == 0 or not collective) and not getattr(err, "quiet", False):
            report(str(err), rank, size)  # quiet: another process prints the same message
        if not collective:
            _abort_if_parallel(EXIT_USER_ERROR)
        return EXIT_USER_ERROR
    except Exception as err:  # noqa: BLE001  (last resort: never leave other ranks waiting)
        rank, size = world_rank_and_size()
        if debug:
            traceback.print_exc()
        report(f"{type(err).__name__}: {err} (run with --debug for the traceback)", rank, size)
        _abort_if_parallel(EXIT_INTERNAL_ERROR)
        return EXIT_INTERNAL_ERROR


def _abort_if_parallel(code: int) -> None:
    """Abort all ranks of COMM_WORLD when there are several; otherwise do nothing."""
    rank, size = world_rank_and_size()
    if size > 1:
        sys.stderr.flush()
        # The launcher forwards each rank's stderr through a pipe; an abort lets it kill every
        # process at once, and on a busy machine it could do so before forwarding the message
        # just written (seen: exit 3 with an empty stderr). Half a second, on the failure path.
        time.sleep(0.5)
        sys.modules["mpi4py.MPI"].COMM_WORLD.Abort(code)


def install_abort_hook() -> None:
    """Make an uncaught exception on any rank, in any thread, abort every rank of COMM_WORLD.

    For scripts that use mpifed as a library (`mpifed train` already ends all ranks itself):
    without it, the other ranks would wait forever in their next collective.
    """
    import threading

    previous = sys.excepthook

    def hook(kind, value, tb):
        previous(kind, value, tb)
        _abort_if_parallel(EXIT_INTERNAL_ERROR)

    def thread_hook(args):
        traceback.print_exception(args.exc_type, args.exc_value, args.exc_traceback)
        _abort_if_parallel(EXIT_INTERNAL_ERROR)

    sys.excepthook = hook
    threading.excepthook = thread_hook
