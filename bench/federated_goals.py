"""Robust and personalised federations against issue 28's goals:
`python bench/federated_goals.py [--goal robust|personal|cost|all] [--quick]`.

The code is mpifed/benchmarks/federated_goals.py.
"""

from mpifed.benchmarks.federated_goals import main

if __name__ == "__main__":
    raise SystemExit(main())
