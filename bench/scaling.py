"""The scaling suite (weak and strong scaling, predictions, plots): `python bench/scaling.py`.

The same as `mpifed bench suite`; the code is mpifed/benchmarks/scaling_suite.py.
"""

from mpifed.benchmarks.scaling_suite import main

if __name__ == "__main__":
    raise SystemExit(main())
