"""The `mpifed` command line.

    mpifed info                                     MPI, ranks, nodes, GPU facts
    mpiexec -n 4 mpifed bench allreduce [...]       all-reduce size sweep
"""

from __future__ import annotations

import argparse
import sys

from .failures import run_guarded


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mpifed", description="Data-parallel and federated training over MPI.",
        epilog="Launch under MPI: mpiexec -n 4 mpifed train run.toml, or srun --mpi=pmi2 mpifed ...")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="print the MPI library, rank and node counts, GPU facts")
    bench = sub.add_parser("bench", help="run a benchmark (allreduce)")
    bench.add_argument("which", choices=["allreduce"], help="which benchmark")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="its options (see --help of each)")
    return parser


def dispatch(args) -> int:
    if args.command == "info":
        from .info import run_info

        return run_info(args)
    if args.command == "bench":
        from ..benchmarks.allreduce import run

        return run(args.rest)
    raise AssertionError(args.command)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return run_guarded(lambda: dispatch(args), debug=args.debug)


if __name__ == "__main__":
    sys.exit(main())
