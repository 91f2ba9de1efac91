"""All-reduce size sweep: `mpiexec -n 4 python bench/allreduce.py [--help]`.

The same as `mpifed bench allreduce`; the code is mpifed/benchmarks/allreduce.py.
"""

from mpifed.benchmarks.allreduce import main

if __name__ == "__main__":
    raise SystemExit(main())
