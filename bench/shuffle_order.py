"""How random block-shuffled order is: `python bench/shuffle_order.py [--help]`.

The same as `mpifed bench shuffle-order`; the code is mpifed/benchmarks/shuffle_order.py.
"""

from mpifed.benchmarks.shuffle_order import main

if __name__ == "__main__":
    raise SystemExit(main())
