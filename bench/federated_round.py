"""Bytes and communication share of a federated round: `python bench/federated_round.py [--help]`.

The same as `mpifed bench federated-round`; the code is mpifed/benchmarks/federated_round.py.
"""

from mpifed.benchmarks.federated_round import main

if __name__ == "__main__":
    raise SystemExit(main())
