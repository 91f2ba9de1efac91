"""Memory and step time per ZeRO stage: `python bench/memory.py [--help]`.

The same as `mpifed bench memory`; the code is mpifed/benchmarks/memory.py.
"""

from mpifed.benchmarks.memory import main

if __name__ == "__main__":
    raise SystemExit(main())
